//! The inference stage of a camera: takes frames from the capture queue, preprocesses and scores
//! those due (`max_fps`) on the shared engine, and hands every frame on, in order, to the camera's
//! worker, which draws and writes the previous frame meanwhile. Never draws, alerts or writes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bundle::Manifest;
use crate::engine::{Engine, Scores};
use crate::pipeline::metrics::{CameraMetrics, Stage};
use crate::pipeline::queue::{FrameQueue, Item};
use crate::pipeline::source::Captured;
use crate::preprocess;

/// A frame on its way to the worker.
pub struct Analysed {
    pub captured: Captured,
    /// The engine's maps and score for a frame that was due; `Err` when inference failed; `None`
    /// for a frame above `max_fps`, passed through un-analysed.
    pub scores: Option<Result<Scores, String>>,
    /// Engine time of this frame (zero when not analysed).
    pub inference: Duration,
}

/// One camera's inference loop.
pub struct Analyser {
    pub manifest: Arc<Manifest>,
    pub engine: Arc<Mutex<Engine>>,
    /// Inference rate cap (0: every frame).
    pub max_fps: f64,
    /// From the capture thread.
    pub input: Arc<FrameQueue<Captured>>,
    /// To the worker.
    pub output: Arc<FrameQueue<Analysed>>,
    pub metrics: Arc<CameraMetrics>,
    /// Preprocessing on the GPU, when the engine runs there.
    #[cfg(feature = "gpu")]
    pub(super) gpu: Option<super::gpu::GpuStage>,
}

impl Analyser {
    /// Runs until the capture thread's end marker has been handed on, or the worker is gone.
    pub fn run(mut self) {
        let interval = (self.max_fps > 0.0).then(|| Duration::from_secs_f64(1.0 / self.max_fps));
        let mut last_analysed: Option<Duration> = None;
        // Once the worker has gone, only our two references (`self.output` and this clone) are
        // left, and nobody would take what we hand on.
        let output = Arc::clone(&self.output);
        let worker_gone = move || Arc::strong_count(&output) == 2;
        loop {
            let Some(item) = self.input.pop(Duration::from_millis(200)) else {
                if worker_gone() {
                    return;
                }
                continue;
            };
            let end = matches!(item, Item::End);
            let item = item.map(|captured| {
                self.metrics.frame_in(captured.arrived);
                if let Some(decode) = captured.decode {
                    self.metrics.stage(Stage::Decode, decode);
                }
                self.metrics.stage(Stage::Queue, captured.arrived.elapsed());
                let due = match (interval, last_analysed) {
                    (Some(interval), Some(last)) => captured.pts >= last + interval,
                    _ => true,
                };
                if !due {
                    return Analysed {
                        captured,
                        scores: None,
                        inference: Duration::ZERO,
                    };
                }
                last_analysed = Some(captured.pts);
                let (scores, inference) = self.score(&captured);
                Analysed {
                    captured,
                    scores: Some(scores),
                    inference,
                }
            });
            if !self.output.push_wait(item, &worker_gone) || end {
                return;
            }
        }
    }

    /// Preprocesses and scores one frame; returns the engine time with the result.
    fn score(&mut self, captured: &Captured) -> (Result<Scores, String>, Duration) {
        let started = Instant::now();
        let on_gpu = self.preprocess_on_gpu(captured);
        let input = (!on_gpu).then(|| {
            preprocess::to_chw(
                &captured.frame,
                self.manifest.model.input_size,
                &self.manifest.normalisation,
            )
        });
        self.metrics.stage(Stage::Preprocess, started.elapsed());
        let tick = Instant::now();
        let scores = match input {
            Some(input) => match self.engine.lock() {
                Ok(mut engine) => engine.run(&input, 1).map_err(|e| e.to_string()),
                Err(_) => Err("the engine lock is poisoned".to_string()),
            },
            None => self.infer_on_gpu(),
        };
        let inference = tick.elapsed();
        if scores.is_ok() {
            self.metrics.analysed(inference);
            self.metrics.stage(Stage::Inference, inference);
        }
        (scores, inference)
    }

    /// Preprocesses the frame on the GPU when this camera has a GPU stage; false means the host
    /// path does it. A GPU failure is said once and hands the camera to the host path.
    #[cfg(feature = "gpu")]
    fn preprocess_on_gpu(&mut self, captured: &Captured) -> bool {
        let Some(stage) = self.gpu.as_mut() else {
            return false;
        };
        match stage.preprocess(&captured.frame, &self.manifest) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("GPU preprocessing failed ({e}); this camera continues on the CPU");
                self.gpu = None;
                false
            }
        }
    }

    #[cfg(not(feature = "gpu"))]
    fn preprocess_on_gpu(&mut self, _captured: &Captured) -> bool {
        false
    }

    /// Inference on the input the GPU stage left on the device.
    #[cfg(feature = "gpu")]
    fn infer_on_gpu(&self) -> Result<Scores, String> {
        match &self.gpu {
            Some(stage) => stage.infer(&self.engine),
            None => Err("no GPU stage for this camera".into()),
        }
    }

    #[cfg(not(feature = "gpu"))]
    fn infer_on_gpu(&self) -> Result<Scores, String> {
        Err("this build has no GPU path".into())
    }
}
