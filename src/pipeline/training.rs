//! Training a new model from a running pipeline (`POST /api/train`): `stpm train` runs as a child
//! process at a lowered priority (nice +10) and with a thread limit for its SGD steps, so the
//! cameras keep their frame rate; its progress file is read for `GET /api/train`, its messages go
//! to the run's log, and the bundle it writes is swapped in when it is done (unless asked not
//! to). One training at a time; the run's end kills it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::model::{ModelControl, ModelInfo, ModelSlot};
use crate::train::progress::{self, TrainProgress};

/// How much nicer than `stpm run` the training process is: the cameras' threads go first.
const NICENESS: libc::c_int = 10;

/// What `POST /api/train` asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRequest {
    /// Good images (an MVTec category or a folder of images); default: the camera's collection
    /// folder, `<storage>/collect/<camera>`.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Whose collection to train on, when `data` is not given.
    #[serde(default)]
    pub camera: Option<String>,
    /// The bundle to write; default: beside the live bundle, `<name>-<unix seconds>`.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Swap the new bundle in once it is written.
    #[serde(default = "yes")]
    pub swap: bool,
    /// Threads the training may use.
    #[serde(default = "one")]
    pub threads: usize,
    /// `stpm train --epochs` (its default when absent).
    #[serde(default)]
    pub epochs: Option<usize>,
    /// `stpm train --max-steps` (its default when absent).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Also write the INT8 graph (`stpm export --precision int8`) before the swap; default: when
    /// the live model runs its INT8 graph, so the CPU engine stays as fast.
    #[serde(default)]
    pub int8: Option<bool>,
}

/// The most epochs `POST /api/train` may ask for (`stpm train`'s default is 12).
pub const MAX_EPOCHS: usize = 1000;
/// The most SGD steps `POST /api/train` may ask for (default 400; 100 000 steps of 8 images are
/// days on a CPU), so a request cannot start a training that never ends.
pub const MAX_STEPS: usize = 100_000;

/// Refuses a request whose `key` is given outside 1 to `max`.
fn within(key: &str, value: Option<usize>, max: usize) -> Result<(), TrainStartError> {
    match value {
        Some(value) if !(1..=max).contains(&value) => Err(TrainStartError::Request(format!(
            "{key} must be 1 to {max}"
        ))),
        _ => Ok(()),
    }
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

/// How a training stands (`GET /api/train`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainStatus {
    /// `running`, `swapping` (written, being swapped in), `done`, `failed` or `cancelled`.
    pub state: String,
    pub data: PathBuf,
    pub out: PathBuf,
    /// The child's progress (phase, epoch, step, loss, ETA), once it wrote some.
    pub progress: Option<TrainProgress>,
    pub seconds: f64,
    /// The model swapped in when done (with `swap`).
    pub model: Option<ModelInfo>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainStartError {
    #[error(
        "a training is already running (GET /api/train says how far; DELETE /api/train stops it)"
    )]
    Busy,
    #[error("{0}")]
    Request(String),
    #[error("cannot start stpm train: {0}")]
    Spawn(std::io::Error),
}

/// What `DELETE /api/train` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The training was told to stop.
    Stopped,
    /// None runs.
    NotRunning,
    /// Its bundle is written and being swapped in: too late to stop.
    Swapping,
}

struct Job {
    status: Arc<Mutex<TrainStatus>>,
    /// The child, until its supervisor has reaped it.
    child: Arc<Mutex<Option<Child>>>,
    /// The supervisor: runs until the child has exited and its bundle is swapped in.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Job {
    /// The child runs, or its bundle is being swapped in.
    fn busy(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// The run's training slot.
pub struct TrainSlot {
    models: Arc<ModelSlot>,
    /// `<storage>/collect`, where each camera's collection is (with `[storage]`).
    collections: Option<PathBuf>,
    cameras: Vec<String>,
    job: Mutex<Option<Job>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TrainSlot {
    pub fn new(models: Arc<ModelSlot>, collections: Option<PathBuf>, cameras: Vec<String>) -> Self {
        Self {
            models,
            collections,
            cameras,
            job: Mutex::new(None),
        }
    }

    /// The latest training's status, if one ran.
    pub fn status(&self) -> Option<TrainStatus> {
        let job = lock(&self.job);
        job.as_ref().map(|job| lock(&job.status).clone())
    }

    /// Starts `stpm train` for `request`; fails at once on a bad request or while one runs.
    pub fn start(&self, request: TrainRequest) -> Result<TrainStatus, TrainStartError> {
        let mut job = lock(&self.job);
        if job.as_ref().is_some_and(Job::busy) {
            return Err(TrainStartError::Busy);
        }
        let (data, out) = self.folders(&request)?;
        within("threads", Some(request.threads), 64)?;
        within("epochs", request.epochs, MAX_EPOCHS)?;
        within("max_steps", request.max_steps, MAX_STEPS)?;
        let live = self.models.live();
        let manifest = &live.model.manifest;
        let progress_file = out.with_extension("progress.json");
        let _ = std::fs::remove_file(&progress_file);
        let program = own_binary().map_err(TrainStartError::Spawn)?;
        let mut command = child_command(&program, request.threads);
        command
            .arg("train")
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .arg("--progress-file")
            .arg(&progress_file)
            // The same teacher and input size as the live model, so the new one can replace it.
            .args(["--backbone", manifest.model.backbone.name()])
            .args(["--image-size", &manifest.model.input_size[0].to_string()]);
        let teacher = Path::new(&manifest.training.teacher_weights);
        if teacher.is_file() {
            command.arg("--teacher-weights").arg(teacher);
        } else if manifest.model.backbone != crate::model::BackboneKind::EfficientNetLite0 {
            return Err(TrainStartError::Request(format!(
                "the live model's teacher weights ({}) are not there: a {} student needs them",
                teacher.display(),
                manifest.model.backbone.name()
            )));
        }
        if let Some(epochs) = request.epochs {
            command.args(["--epochs", &epochs.to_string()]);
        }
        if let Some(steps) = request.max_steps {
            command.args(["--max-steps", &steps.to_string()]);
        }
        // The INT8 graph `stpm export --precision int8` writes is the CPU kind: by default only
        // when the live model runs one of that kind.
        let live_int8 = live.model.precision == crate::bundle::Precision::Int8;
        let int8 = request
            .int8
            .unwrap_or(live_int8 && !manifest.int8_is_for_tensorrt());
        if live_int8 && !int8 && self.models.precision_required() {
            return Err(TrainStartError::Request(
                "[model] precision = \"int8\": the new bundle needs its INT8 graph (\"int8\": true)"
                    .into(),
            ));
        }
        let mut child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => TrainStartError::Request(e.to_string()),
            _ => TrainStartError::Spawn(e),
        })?;
        log::info!(
            "train: stpm train on {} → {} started (pid {}, nice +{NICENESS}, {} thread(s) for its steps){}",
            data.display(),
            out.display(),
            child.id(),
            request.threads,
            if request.swap {
                "; swapped in when done"
            } else {
                ""
            }
        );
        let status = Arc::new(Mutex::new(TrainStatus {
            state: "running".into(),
            data,
            out: out.clone(),
            progress: None,
            seconds: 0.0,
            model: None,
            error: None,
        }));
        let forwarders = forward_output(&mut child);
        let child = Arc::new(Mutex::new(Some(child)));
        let supervisor = Supervisor {
            status: Arc::clone(&status),
            child: Arc::clone(&child),
            models: Arc::clone(&self.models),
            progress_file,
            swap: request.swap,
            int8: int8.then_some((program, request.threads)),
            started: Instant::now(),
        };
        let spawned = std::thread::Builder::new()
            .name("train".into())
            .spawn(move || {
                supervisor.run();
                for forwarder in forwarders.into_iter().flatten() {
                    let _ = forwarder.join();
                }
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                if let Some(mut child) = lock(&child).take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(TrainStartError::Spawn(e));
            }
        };
        let first = lock(&status).clone();
        if let Some(old) = job.as_mut().and_then(|old| old.thread.take()) {
            // Finished (not busy): joined at once.
            let _ = old.join();
        }
        *job = Some(Job {
            status,
            child,
            thread: Some(thread),
        });
        Ok(first)
    }

    /// The data and output folders of `request`.
    fn folders(&self, request: &TrainRequest) -> Result<(PathBuf, PathBuf), TrainStartError> {
        let bad = |message: String| Err(TrainStartError::Request(message));
        // The camera also names the default output folder, so it must be one of ours even when
        // the images come from `data`.
        if let Some(camera) = &request.camera
            && !self.cameras.contains(camera)
        {
            return bad(format!("no camera {camera} in this pipeline"));
        }
        let data = match (&request.data, &request.camera) {
            (Some(data), _) => data.clone(),
            (None, Some(camera)) => match &self.collections {
                Some(folder) => folder.join(camera),
                None => {
                    return bad(format!(
                        "camera {camera} has no collection ([storage] is off): name the images with \"data\""
                    ));
                }
            },
            (None, None) => return bad("name the images: \"data\" (a folder) or \"camera\"".into()),
        };
        if !data.is_dir() {
            return bad(format!("{}: no such folder", data.display()));
        }
        let out = match &request.out {
            Some(out) => out.clone(),
            None => {
                let live = &self.models.live().model.bundle;
                let name = request
                    .camera
                    .clone()
                    .or_else(|| Some(data.file_name()?.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "trained".into());
                let now = super::unix_now() as u64;
                live.parent()
                    .unwrap_or(Path::new("."))
                    .join(format!("{name}-{now}"))
            }
        };
        if out.join(crate::bundle::MANIFEST_FILE).exists()
            && super::model::same_folder(&out, &self.models.live().model.bundle)
        {
            return bad(format!(
                "{} is the live bundle: train into another folder and swap it in",
                out.display()
            ));
        }
        Ok((data, out))
    }

    /// Stops a running training (SIGTERM: `stpm train` ends its step and writes the best
    /// checkpoint so far, which is not swapped in).
    pub fn cancel(&self) -> Cancel {
        self.signal(libc::SIGTERM)
    }

    /// Marks a running training cancelled and sends its process `signal` (a cancelled one still
    /// finishing gets it too).
    fn signal(&self, signal: libc::c_int) -> Cancel {
        let job = lock(&self.job);
        let Some(job) = job.as_ref() else {
            return Cancel::NotRunning;
        };
        let mut status = lock(&job.status);
        let was_running = match status.state.as_str() {
            "swapping" => return Cancel::Swapping,
            "running" => {
                status.state = "cancelled".into();
                true
            }
            _ => false,
        };
        drop(status);
        // The child is reaped (and taken) under this lock, so its pid is still ours here.
        match lock(&job.child).as_ref() {
            Some(child) => {
                // SAFETY: kill() on the pid of a child this process has not yet reaped.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, signal);
                }
                Cancel::Stopped
            }
            // Between the training and the export: the supervisor sees the state and stops.
            None if was_running => Cancel::Stopped,
            None => Cancel::NotRunning,
        }
    }

    /// At the run's end: kills a training process still there (its bundle is not needed) and
    /// waits for its supervisor.
    pub fn stop(&self) {
        if self.signal(libc::SIGKILL) == Cancel::Stopped {
            log::warn!("train: the run is ending, the training was stopped");
        }
        let thread = lock(&self.job).as_mut().and_then(|job| job.thread.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The running binary itself (even when a newer one has replaced it on disk since).
fn own_binary() -> std::io::Result<PathBuf> {
    match Path::new("/proc/self/exe") {
        path if path.exists() => Ok(path.to_path_buf()),
        _ => std::env::current_exe(),
    }
}

/// `program` as a child of the run: nicer by [`NICENESS`], its compute threads (rayon, OpenMP)
/// limited to `threads`, its output piped (for [`forward`]).
fn child_command(program: &Path, threads: usize) -> Command {
    let mut command = Command::new(program);
    command
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the closure only makes the nice(2) system call and reads and
    // writes errno; it allocates nothing.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            // -1 is also a valid new niceness: errno tells a failure, which fails the start.
            *libc::__errno_location() = 0;
            if libc::nice(NICENESS) == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// Copies what `child` writes (stdout and stderr) into the log; the threads end at its exit.
fn forward_output(child: &mut Child) -> [Option<std::thread::JoinHandle<()>>; 2] {
    [
        child.stdout.take().map(forward),
        child.stderr.take().map(forward),
    ]
}

/// Copies each line the child writes into the log, its warnings and errors as warnings.
fn forward(stream: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let line = line.trim_end();
            if line.starts_with("warning:") || line.starts_with("error:") {
                log::warn!("train: {line}");
            } else if !line.is_empty() {
                log::info!("train: {line}");
            }
        }
    })
}

/// Waits for the child, keeping its status up to date, then swaps its bundle in.
struct Supervisor {
    status: Arc<Mutex<TrainStatus>>,
    child: Arc<Mutex<Option<Child>>>,
    models: Arc<ModelSlot>,
    progress_file: PathBuf,
    swap: bool,
    /// Write the INT8 graph after training: with this binary, at this many threads.
    int8: Option<(PathBuf, usize)>,
    started: Instant,
}

impl Supervisor {
    /// Waits for the child in `self.child` (the training, then the export), keeping the status's
    /// time and progress up to date; `None` when there was none.
    fn wait(&self) -> Option<std::io::Result<std::process::ExitStatus>> {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let progress = progress::read(&self.progress_file);
            {
                let mut status = lock(&self.status);
                status.seconds = self.started.elapsed().as_secs_f64();
                if progress.is_some() {
                    status.progress = progress;
                }
            }
            let mut child = lock(&self.child);
            let running = child.as_mut()?;
            match running.try_wait() {
                Ok(Some(exit)) => {
                    *child = None;
                    return Some(Ok(exit));
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(mut lost) = child.take() {
                        let _ = lost.kill();
                        let _ = lost.wait();
                    }
                    return Some(Err(e));
                }
            }
        }
    }

    /// `stpm export --precision int8` on the new bundle, as a child like the training.
    fn export_int8(&self, out: &Path, program: &Path, threads: usize) -> Result<(), String> {
        log::info!("train: writing the INT8 graph of {}", out.display());
        let mut command = child_command(program, threads);
        command
            .arg("export")
            .arg("--model")
            .arg(out)
            .args(["--precision", "int8", "--quiet"]);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start stpm export: {e}"))?;
        let forwarders = forward_output(&mut child);
        {
            // A DELETE meanwhile stops this child.
            let mut slot = lock(&self.child);
            if lock(&self.status).state == "cancelled" {
                let _ = child.kill();
                let _ = child.wait();
                return Err("stopped (DELETE /api/train or the run's end)".into());
            }
            *slot = Some(child);
        }
        let exit = self.wait();
        for forwarder in forwarders.into_iter().flatten() {
            let _ = forwarder.join();
        }
        match exit {
            _ if lock(&self.status).state == "cancelled" => {
                Err("stopped (DELETE /api/train or the run's end)".into())
            }
            Some(Ok(exit)) if exit.success() => Ok(()),
            Some(Ok(exit)) => Err(format!(
                "stpm export --precision int8 failed ({exit}); its messages are in the log"
            )),
            Some(Err(e)) => Err(format!("cannot wait for stpm export: {e}")),
            None => Err("stpm export was lost".into()),
        }
    }

    fn run(self) {
        let exit = self.wait();
        let _ = std::fs::remove_file(&self.progress_file);
        let cancelled = lock(&self.status).state == "cancelled";
        let outcome = match exit {
            _ if cancelled => Err("stopped (DELETE /api/train or the run's end)".to_string()),
            Some(Ok(exit)) if exit.success() => Ok(()),
            Some(Ok(exit)) => Err(format!(
                "stpm train failed ({exit}); its messages are in the log"
            )),
            Some(Err(e)) => Err(format!("cannot wait for stpm train: {e}")),
            None => Err("stpm train was lost".into()),
        };
        let out = lock(&self.status).out.clone();
        let outcome = outcome.and_then(|()| match &self.int8 {
            Some((program, threads)) => self.export_int8(&out, program, *threads),
            None => Ok(()),
        });
        let result = outcome.and_then(|()| {
            if !self.swap {
                return Ok(None);
            }
            // From here on a DELETE is too late (it answers so).
            {
                let mut status = lock(&self.status);
                if status.state == "cancelled" {
                    return Err("stopped (DELETE /api/train)".to_string());
                }
                status.state = "swapping".into();
            }
            self.models
                .swap(&out)
                .map(Some)
                .map_err(|e| format!("trained, but not swapped in: {e}"))
        });
        let mut status = lock(&self.status);
        status.seconds = self.started.elapsed().as_secs_f64();
        match result {
            Ok(swapped) => {
                status.state = "done".into();
                status.model = swapped.map(|s| s.model);
                log::info!(
                    "train: done in {:.0} s, bundle {}{}",
                    status.seconds,
                    out.display(),
                    status
                        .model
                        .as_ref()
                        .map(|m| format!(", model {} live", m.id))
                        .unwrap_or_default()
                );
            }
            Err(error) => {
                if status.state != "cancelled" {
                    status.state = "failed".into();
                }
                log::warn!("train: {error}");
                status.error = Some(error);
            }
        }
    }
}
