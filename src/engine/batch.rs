//! Batched inference across callers: one session shared by several cameras' analysers, which runs
//! the frames waiting for it in one call of up to `max_batch` images. There is no batching thread:
//! the first caller to find the session free leads, waits up to `wait` for the frames of the other
//! participants that have one in hand (not those still waiting for their camera's next frame),
//! runs the batch and hands each caller its own map and score. With `max_batch = 1` it is a plain
//! lock around the session.
//!
//! On the CUDA provider every call runs as many images as the session has cameras (at most
//! `max_batch`), the unused places padded: ONNX Runtime's CUDA provider keeps one input shape per
//! convolution and, with cuDNN 9, builds that layer's cuDNN plan again whenever the shape changes,
//! so calls of 1, 3, 2, 4 … images (a batch takes the frames that are there) would each pay for
//! every layer's plan. The shape then changes only when a camera joins or leaves; the price is
//! that a call with fewer frames costs as much as a full one. (TensorRT's engine takes any batch
//! of its optimisation profile without rebuilding, so it is not padded.)

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::{Engine, EngineError, ExecutionProvider, Scores};

/// Most images one call may hold (`model.batch`; also the TensorRT profile's largest batch).
pub const MAX_BATCH: usize = 32;

/// Longest a leader waits for a batch to fill (`model.batch_wait_ms` is checked against it).
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// One image's model input, as a caller hands it over.
pub enum Input {
    /// NCHW float32 [3, H, W] on the host; handed back with the outcome, for reuse.
    Host(Vec<f32>),
    /// [3, H, W] float32 already on the GPU (the `gpu` preprocessing's output).
    #[cfg(feature = "gpu")]
    Device(DeviceInput),
}

/// A device address of one preprocessed image.
#[cfg(feature = "gpu")]
#[derive(Debug, Clone, Copy)]
pub struct DeviceInput {
    pointer: u64,
    len: usize,
}

#[cfg(feature = "gpu")]
impl DeviceInput {
    /// `len` float32 values at the device address `pointer`.
    ///
    /// # Safety
    /// `pointer` must address at least `len` float32 values in device 0's memory, written by work
    /// that has finished, and they must stay valid and unchanged until the
    /// [`Participant::score`] call they are handed to returns.
    pub unsafe fn new(pointer: u64, len: usize) -> Self {
        Self { pointer, len }
    }
}

/// Why a frame was not scored. Every frame of a failed call gets the same error, so it is cheap
/// to clone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Engine(Arc<EngineError>),
    #[error("a batch of {n} gave {scores} scores and {values} map values")]
    BatchShape {
        n: usize,
        scores: usize,
        values: usize,
    },
    #[error("a batch of {n} gave no map values")]
    NoMapValues { n: usize },
    #[error("{0}")]
    Runner(&'static str),
    /// Preparing the input on the GPU or gathering a batch there.
    #[error("{0}")]
    Gpu(String),
}

impl From<EngineError> for ScoreError {
    fn from(error: EngineError) -> Self {
        Self::Engine(Arc::new(error))
    }
}

/// What a caller gets back.
pub struct Outcome {
    /// The input it handed over (a host buffer comes back for the next frame).
    pub input: Input,
    /// Its image's map [1, 1, H, W] and score [1], or why the call failed.
    pub scores: Result<Scores, ScoreError>,
    /// Engine time of the call its image was in.
    pub inference: Duration,
    /// Frames in that call (its callers' images).
    pub batch: usize,
    /// Images the call ran, padding included (on CUDA: the session's cameras, at most its
    /// `max_batch`).
    pub images: usize,
}

struct Request {
    id: u64,
    input: Input,
}

#[derive(Default)]
struct Queue {
    next_id: u64,
    pending: VecDeque<Request>,
    done: HashMap<u64, Outcome>,
    /// A leader is gathering or running a batch.
    running: bool,
    /// Callers that may send a frame.
    participants: usize,
    /// Of those, the ones waiting for their camera's next frame (a leader does not wait for
    /// them: an offline camera, or one between frames, would hold every batch up).
    idle: usize,
}

/// What the leader holds while it runs a batch.
struct Runner {
    engine: Engine,
    /// The host batch, reused from call to call.
    host: Vec<f32>,
    /// Every call runs one image per participant (at most `max_batch`), padded; else the frames it
    /// has.
    padded: bool,
    #[cfg(feature = "gpu")]
    device: Option<DeviceBatch>,
}

/// A session shared by several callers, batching their images.
pub struct SharedSession {
    runner: Mutex<Runner>,
    queue: Mutex<Queue>,
    changed: Condvar,
    max_batch: usize,
    wait: Duration,
}

/// One caller's place at a [`SharedSession`]; dropping it tells a waiting leader not to wait for
/// this caller's frames any more.
pub struct Participant<'a> {
    session: &'a SharedSession,
    /// Counted in the queue's `idle`.
    idle: AtomicBool,
}

impl SharedSession {
    /// `engine` shared by callers whose images are run `max_batch` at a time (clamped to
    /// 1..=[`MAX_BATCH`]), waiting at most `wait` (at most [`MAX_WAIT`]) for a batch to fill. On
    /// CUDA each call is padded to one image per participant (see the module's doc).
    pub fn new(engine: Engine, max_batch: usize, wait: Duration) -> Self {
        let padded = engine.provider() == ExecutionProvider::Cuda;
        Self {
            runner: Mutex::new(Runner {
                engine,
                host: Vec::new(),
                padded,
                #[cfg(feature = "gpu")]
                device: None,
            }),
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            max_batch: max_batch.clamp(1, MAX_BATCH),
            wait: wait.min(MAX_WAIT),
        }
    }

    /// Pads every call to one image per participant, at most `max_batch` (`true`, CUDA's
    /// default), or runs each with the frames it has (`false`, the CPU's and TensorRT's).
    pub fn padded(self, padded: bool) -> Self {
        self.runner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .padded = padded;
        self
    }

    /// Registers a caller: a leader waits for the frames of every registered caller that is not
    /// [`Participant::waiting_for_frame`] (up to `max_batch`), so each camera's analyser on this
    /// session joins once.
    pub fn join(&self) -> Participant<'_> {
        self.queue().participants += 1;
        Participant {
            session: self,
            idle: AtomicBool::new(false),
        }
    }

    /// The queue; a poisoned lock is taken over (the queue is only pushed to and drained, never
    /// left half-changed, so no caller's frame is lost to another caller's panic).
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Scores `input` (alone or with other callers' images) and returns its outcome.
    fn submit(&self, input: Input) -> Outcome {
        let mut queue = self.queue();
        let id = queue.next_id;
        queue.next_id += 1;
        queue.pending.push_back(Request { id, input });
        self.changed.notify_all();
        loop {
            if let Some(outcome) = queue.done.remove(&id) {
                return outcome;
            }
            if !queue.running {
                queue.running = true;
                let (batch, participants) = self.gather(queue);
                // A panic in the run (ONNX Runtime, a driver) must not leave `running` set and
                // every other camera waiting: the batch's callers get an error instead.
                let ids: Vec<u64> = batch.iter().map(|r| r.id).collect();
                let outcomes =
                    std::panic::catch_unwind(AssertUnwindSafe(|| self.run(batch, participants)))
                        .unwrap_or_else(|_| {
                            ids.into_iter()
                                .map(|id| (id, Outcome::failed(Input::Host(Vec::new()), PANICKED)))
                                .collect()
                        });
                queue = self.queue();
                queue.done.extend(outcomes);
                queue.running = false;
                self.changed.notify_all();
                continue;
            }
            queue = self
                .changed
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// As the leader: waits until the batch is full, the frames of every participant with one in
    /// hand are in, or `wait` has passed; then takes the batch out of the queue (and lets the
    /// queue go for the run). Also says how many images a padded call runs: one per participant,
    /// at most `max_batch`.
    fn gather(&self, mut queue: MutexGuard<'_, Queue>) -> (Vec<Request>, usize) {
        let deadline = Instant::now() + self.wait;
        loop {
            let busy = queue.participants.saturating_sub(queue.idle);
            let wanted = self.max_batch.min(busy.max(1));
            let now = Instant::now();
            if queue.pending.len() >= wanted || now >= deadline {
                break;
            }
            queue = match self.changed.wait_timeout(queue, deadline - now) {
                Ok((queue, _)) => queue,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        let take = queue.pending.len().min(self.max_batch);
        let places = queue.participants.clamp(1, self.max_batch);
        (queue.pending.drain(..take).collect(), places)
    }

    /// Runs one batch: host images in one call, device images in another (a camera whose GPU
    /// stage failed sends host images beside the others' device ones).
    fn run(&self, batch: Vec<Request>, places: usize) -> Vec<(u64, Outcome)> {
        // A panic in an earlier run poisoned the lock; the session and buffers are still usable
        // (that run's callers got an error), so the next batches run.
        let mut runner = self.runner.lock().unwrap_or_else(|poisoned| {
            self.runner.clear_poison();
            poisoned.into_inner()
        });
        let (host, device): (Vec<Request>, Vec<Request>) =
            batch.into_iter().partition(|r| r.input.host().is_some());
        let places = if runner.padded { places } else { 1 };
        let mut outcomes = runner.run_host(host, places);
        outcomes.extend(runner.run_device(device, places));
        outcomes
    }
}

const PANICKED: &str = "the inference call panicked";

impl Participant<'_> {
    /// Scores one image; see [`SharedSession`].
    pub fn score(&self, input: Input) -> Outcome {
        self.waiting_for_frame(false);
        self.session.submit(input)
    }

    /// Says whether this caller is waiting for its camera's next frame (a leader does not wait
    /// for its frame then) or has one in hand, which a leader waits for (up to its `wait`).
    pub fn waiting_for_frame(&self, waiting: bool) {
        if self.idle.swap(waiting, Ordering::Relaxed) == waiting {
            return;
        }
        let mut queue = self.session.queue();
        if waiting {
            queue.idle += 1;
        } else {
            queue.idle = queue.idle.saturating_sub(1);
        }
        drop(queue);
        self.session.changed.notify_all();
    }
}

impl Drop for Participant<'_> {
    fn drop(&mut self) {
        let mut queue = self.session.queue();
        queue.participants = queue.participants.saturating_sub(1);
        if self.idle.load(Ordering::Relaxed) {
            queue.idle = queue.idle.saturating_sub(1);
        }
        drop(queue);
        self.session.changed.notify_all();
    }
}

impl Input {
    /// The host buffer back, for a host input.
    pub fn into_host(self) -> Option<Vec<f32>> {
        match self {
            Input::Host(values) => Some(values),
            #[cfg(feature = "gpu")]
            Input::Device(_) => None,
        }
    }

    /// The host values, for a host input.
    pub fn host(&self) -> Option<&[f32]> {
        match self {
            Input::Host(values) => Some(values),
            #[cfg(feature = "gpu")]
            Input::Device(_) => None,
        }
    }
}

impl Outcome {
    fn failed(input: Input, why: &'static str) -> Self {
        Self {
            input,
            scores: Err(ScoreError::Runner(why)),
            inference: Duration::ZERO,
            batch: 0,
            images: 0,
        }
    }
}

/// Each image's share of a batch's `scores` (maps [N, 1, H, W] and scores [N]).
fn split(scores: Scores, n: usize) -> Result<Vec<Scores>, ScoreError> {
    if n == 1 {
        return Ok(vec![scores]);
    }
    if scores.scores.len() != n || !scores.maps.len().is_multiple_of(n) {
        return Err(ScoreError::BatchShape {
            n,
            scores: scores.scores.len(),
            values: scores.maps.len(),
        });
    }
    let per_map = scores.maps.len() / n;
    if per_map == 0 {
        return Err(ScoreError::NoMapValues { n });
    }
    Ok(scores
        .maps
        .chunks_exact(per_map)
        .zip(&scores.scores)
        .map(|(map, &score)| Scores {
            maps: map.to_vec(),
            scores: vec![score],
        })
        .collect())
}

/// Hands each request its share of a call's result of `images` images (or the call's error);
/// the shares of padded places beyond the requests are dropped.
fn hand_out(
    requests: Vec<Request>,
    result: Result<Scores, ScoreError>,
    images: usize,
    inference: Duration,
) -> Vec<(u64, Outcome)> {
    let n = requests.len();
    let shares: Vec<Result<Scores, ScoreError>> =
        match result.and_then(|scores| split(scores, images)) {
            Ok(shares) => shares.into_iter().take(n).map(Ok).collect(),
            Err(why) => vec![Err(why); n],
        };
    requests
        .into_iter()
        .zip(shares)
        .map(|(r, scores)| {
            let outcome = Outcome {
                input: r.input,
                scores,
                inference,
                batch: n,
                images,
            };
            (r.id, outcome)
        })
        .collect()
}

impl Runner {
    /// Runs host inputs in one call of at least `places` images (padded).
    fn run_host(&mut self, requests: Vec<Request>, places: usize) -> Vec<(u64, Outcome)> {
        let n = requests.len();
        if n == 0 {
            return Vec::new();
        }
        let images = n.max(places);
        let started = Instant::now();
        let result = match requests.as_slice() {
            // One image: straight from the caller's buffer.
            [one] if images == 1 => self.engine.run(one.input.host().unwrap_or_default(), 1),
            _ => {
                self.host.clear();
                for request in &requests {
                    self.host
                        .extend_from_slice(request.input.host().unwrap_or_default());
                }
                // Padded places: zeros (any finite input; their results are dropped).
                self.host.resize(self.host.len() / n * images, 0.0);
                self.engine.run(&self.host, images)
            }
        };
        hand_out(
            requests,
            result.map_err(ScoreError::from),
            images,
            started.elapsed(),
        )
    }
}

/// Without the `gpu` feature there are no device inputs.
#[cfg(not(feature = "gpu"))]
impl Runner {
    fn run_device(&mut self, requests: Vec<Request>, _places: usize) -> Vec<(u64, Outcome)> {
        debug_assert!(requests.is_empty());
        Vec::new()
    }
}

/// The device buffer a batch of GPU-resident images is gathered into, and the stream that copies.
#[cfg(feature = "gpu")]
struct DeviceBatch {
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    buffer: cudarc::driver::CudaSlice<f32>,
}

#[cfg(feature = "gpu")]
impl Runner {
    /// Runs device inputs in one call of at least `places` images (padded).
    fn run_device(&mut self, requests: Vec<Request>, places: usize) -> Vec<(u64, Outcome)> {
        let n = requests.len();
        if n == 0 {
            return Vec::new();
        }
        let inputs: Vec<DeviceInput> = requests
            .iter()
            .filter_map(|r| match r.input {
                Input::Device(input) => Some(input),
                Input::Host(_) => None,
            })
            .collect();
        let images = n.max(places);
        let started = Instant::now();
        let result = match inputs.as_slice() {
            // One image: in place, where its camera's preprocessing left it.
            // SAFETY: the caller blocks in `submit` until its outcome is handed out, so its
            // buffer (finished: the stage synchronised its stream) outlives this call.
            [one] if images == 1 => unsafe { self.engine.run_device_at(one.pointer, one.len, 1) }
                .map_err(ScoreError::from),
            _ => self.gather_on_device(&inputs, images),
        };
        hand_out(requests, result, images, started.elapsed())
    }

    /// Copies `inputs` one after another into the batch buffer, then runs its first `images`
    /// images (≥ `inputs.len()`; the places after the inputs hold earlier frames or zeros) in one
    /// call.
    fn gather_on_device(
        &mut self,
        inputs: &[DeviceInput],
        images: usize,
    ) -> Result<Scores, ScoreError> {
        let gpu = |message: String| ScoreError::Gpu(message);
        use cudarc::driver::{DevicePtrMut, result};

        let len = inputs.first().map_or(0, |i| i.len);
        if inputs.iter().any(|i| i.len != len) {
            return Err(gpu("the cameras' device inputs differ in size".into()));
        }
        if images < inputs.len() || images > MAX_BATCH {
            return Err(gpu(format!(
                "a call of {images} images cannot hold {} inputs",
                inputs.len()
            )));
        }
        let total = len * images;
        if self
            .device
            .as_ref()
            .is_none_or(|batch| batch.buffer.len() < total)
        {
            self.device = None;
            let context = crate::gpu::GpuContext::try_new().map_err(|e| gpu(e.to_string()))?;
            let stream = std::sync::Arc::clone(context.stream());
            let buffer = stream
                .alloc_zeros::<f32>(len * MAX_BATCH)
                .map_err(|e| gpu(format!("allocating the batch buffer: {e}")))?;
            self.device = Some(DeviceBatch { stream, buffer });
        }
        let Some(batch) = self.device.as_mut() else {
            return Err(gpu("no batch buffer".into()));
        };
        batch
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| gpu(format!("binding the CUDA context: {e}")))?;
        let stream = std::sync::Arc::clone(&batch.stream);
        let (base, record) = batch.buffer.device_ptr_mut(&stream);
        let bytes = len * std::mem::size_of::<f32>();
        let mut copied = Ok(());
        for (index, input) in inputs.iter().enumerate() {
            // SAFETY: the destination is image `index` of a buffer of MAX_BATCH ≥ inputs.len()
            // images of `len` values; each source holds `len` finished values that its caller
            // keeps alive until the outcomes are handed out (`DeviceInput::new`'s contract).
            copied = unsafe {
                result::memcpy_dtod_async(
                    base + (index * bytes) as u64,
                    input.pointer,
                    bytes,
                    stream.cu_stream(),
                )
            };
            if copied.is_err() {
                break;
            }
        }
        drop(record);
        // Wait for the copies queued so far even when one failed: their sources are the
        // cameras' buffers, which may change once the outcomes are handed out.
        let finished = stream.synchronize();
        copied.map_err(|e| gpu(format!("gathering the batch on the GPU: {e}")))?;
        finished.map_err(|e| gpu(format!("gathering the batch on the GPU: {e}")))?;
        // SAFETY: `base` holds `total` initialised values (the inputs just copied, the stream has
        // finished; then zeros or earlier frames), owned by `self.device`, which this call does
        // not touch.
        unsafe { self.engine.run_device_at(base, total, images) }.map_err(ScoreError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_result_is_split_per_image_in_order() {
        let scores = Scores {
            maps: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            scores: vec![0.1, 0.2, 0.3],
        };
        let shares = split(scores, 3).expect("three shares");
        let maps: Vec<Vec<f32>> = shares.iter().map(|s| s.maps.clone()).collect();
        assert_eq!(maps, [vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]]);
        let each: Vec<Vec<f32>> = shares.iter().map(|s| s.scores.clone()).collect();
        assert_eq!(each, [vec![0.1], vec![0.2], vec![0.3]]);
    }

    #[test]
    fn a_batch_result_of_the_wrong_size_is_an_error() {
        let scores = Scores {
            maps: vec![1.0; 6],
            scores: vec![0.1, 0.2],
        };
        let error = split(scores, 3)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("a batch of 3 gave 2 scores"), "{error}");
        let empty = Scores {
            maps: Vec::new(),
            scores: vec![0.1, 0.2],
        };
        let error = split(empty, 2)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("a batch of 2 gave no map values"), "{error}");
    }
}
