//! The inference stage of a camera: takes frames from the capture queue, preprocesses and scores
//! those due (`max_fps`) on an engine session, and hands every frame on, in order, to the camera's
//! worker, which draws and writes the previous frame meanwhile. With `model.sessions = N` a camera
//! has N analysers on N sessions, taking frames in turn and handing them on in the order taken.
//! Never draws, alerts or writes.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::engine::Scores;
use crate::engine::batch::{Input, Participant, ScoreError};
use crate::pipeline::metrics::{CameraMetrics, Stage};
use crate::pipeline::model::{Model, ModelSlot};
use crate::pipeline::queue::{FrameQueue, Item};
use crate::pipeline::source::Captured;
use crate::preprocess;

/// A frame on its way to the worker.
pub struct Analysed {
    pub captured: Captured,
    /// The engine's maps and score for a frame that was due; `Err` when inference failed; `None`
    /// for a frame above `max_fps`, passed through un-analysed.
    pub scores: Option<Result<Scores, ScoreError>>,
    /// The model that scored it (`None` when not analysed).
    pub model: Option<Arc<Model>>,
    /// Engine time of this frame's call (zero when not analysed).
    pub inference: Duration,
    /// Images in that call (other cameras' frames beside this one when more than 1; 0 when not
    /// analysed).
    pub batch: usize,
}

/// What a camera's analysers share: the queues at both ends and the order frames were taken in.
pub struct Intake {
    /// From the capture thread.
    input: Arc<FrameQueue<Captured>>,
    /// To the worker (which holds the only other reference).
    output: Arc<FrameQueue<Analysed>>,
    /// Inference rate cap interval (`None`: every frame).
    interval: Option<Duration>,
    taken: Mutex<Taken>,
    /// Ticket of the next item to hand on.
    turn: Mutex<u64>,
    turn_changed: Condvar,
}

#[derive(Default)]
struct Taken {
    /// Ticket of the next item taken.
    next: u64,
    /// Stream time of the last frame due for inference.
    last_analysed: Option<Duration>,
    /// The end marker has been taken: the other analysers stop.
    ended: bool,
}

/// What [`Intake::take`] gives.
enum Next {
    Ticket(Ticket),
    /// The end was taken (by any analyser), or the worker is gone.
    Stop,
    /// Another model was swapped in: move to its session before taking a frame.
    Swapped,
}

/// An item taken from the capture queue, with its place in the order.
struct Ticket {
    number: u64,
    item: Item<Captured>,
    due: bool,
}

impl Intake {
    pub fn new(
        input: Arc<FrameQueue<Captured>>,
        output: Arc<FrameQueue<Analysed>>,
        max_fps: f64,
    ) -> Self {
        Self {
            input,
            output,
            interval: (max_fps > 0.0).then(|| Duration::from_secs_f64(1.0 / max_fps)),
            taken: Mutex::new(Taken::default()),
            turn: Mutex::new(0),
            turn_changed: Condvar::new(),
        }
    }

    fn worker_gone(&self) -> bool {
        Arc::strong_count(&self.output) == 1
    }

    /// The next item with its ticket, or why there is none. `swapped` is asked while waiting
    /// (a camera without frames must not keep a replaced model's session). The lock makes taking
    /// and numbering one step.
    fn take(&self, swapped: &dyn Fn() -> bool) -> Next {
        let Ok(mut taken) = self.taken.lock() else {
            return Next::Stop;
        };
        loop {
            if taken.ended || self.worker_gone() {
                return Next::Stop;
            }
            if swapped() {
                return Next::Swapped;
            }
            let Some(item) = self.input.pop(Duration::from_millis(200)) else {
                continue;
            };
            let due = match &item {
                Item::Frame(captured) => {
                    let due = match (self.interval, taken.last_analysed) {
                        (Some(interval), Some(last)) => captured.pts >= last + interval,
                        _ => true,
                    };
                    if due {
                        taken.last_analysed = Some(captured.pts);
                    }
                    due
                }
                Item::End => {
                    taken.ended = true;
                    false
                }
                _ => false,
            };
            let number = taken.next;
            taken.next += 1;
            return Next::Ticket(Ticket { number, item, due });
        }
    }

    /// Hands `item` on once every earlier ticket has been; false when the worker is gone.
    fn hand_on(&self, number: u64, item: Item<Analysed>) -> bool {
        let Ok(mut turn) = self.turn.lock() else {
            return false;
        };
        while *turn != number {
            if self.worker_gone() {
                return false;
            }
            turn = match self
                .turn_changed
                .wait_timeout(turn, Duration::from_millis(200))
            {
                Ok((turn, _)) => turn,
                Err(_) => return false,
            };
        }
        let pushed = self.output.push_wait(item, &|| self.worker_gone());
        *turn += 1;
        self.turn_changed.notify_all();
        pushed
    }
}

/// One inference loop of a camera (one of `model.sessions`).
pub struct Analyser {
    /// The live model; this analyser runs its session `number` (shared with the same-numbered
    /// analyser of other cameras, whose frames it may run in the same call) and moves to a new
    /// model's between two frames.
    pub models: Arc<ModelSlot>,
    pub number: usize,
    pub intake: Arc<Intake>,
    pub metrics: Arc<CameraMetrics>,
    /// The model input of the host path, written in place for every frame (no 3×H×W float
    /// allocation per frame).
    pub input: Vec<f32>,
    /// Preprocessing on the GPU, when the engine runs there.
    #[cfg(feature = "gpu")]
    pub(super) gpu: Option<super::gpu::GpuStage>,
}

impl Analyser {
    /// Runs until the capture thread's end marker has been taken (and, by this analyser, handed
    /// on), or the worker is gone.
    pub fn run(mut self) {
        let intake = Arc::clone(&self.intake);
        loop {
            let (generation, live) = self.models.current();
            let Some(session) = live.sessions.get(self.number).cloned() else {
                log::error!("analyser {}: the model has no session for it", self.number);
                return;
            };
            let model = Arc::clone(&live.model);
            drop(live);
            if !self.run_model(&intake, &session.join(), &model, generation) {
                return;
            }
        }
    }

    /// Runs frames on one model's session until a swap (true: run the new model) or the end
    /// (false).
    fn run_model(
        &mut self,
        intake: &Intake,
        participant: &Participant,
        model: &Arc<Model>,
        generation: u64,
    ) -> bool {
        let models = Arc::clone(&self.models);
        let swapped = move || models.generation() != generation;
        loop {
            // While it waits for its camera's next frame (an offline camera, a live one between
            // frames), a batch leader on the session does not wait for it. Handing on counts as
            // busy: a file or a backlog has the next frame ready at once.
            participant.waiting_for_frame(true);
            let Ticket { number, item, due } = match intake.take(&swapped) {
                Next::Ticket(ticket) => ticket,
                Next::Swapped => return true,
                Next::Stop => return false,
            };
            // Only a frame due for inference is one a batch leader should wait for.
            participant.waiting_for_frame(!due);
            let end = matches!(item, Item::End);
            let item = item.map(|captured| {
                self.metrics.frame_in(captured.arrived);
                if let Some(decode) = captured.decode {
                    self.metrics.stage(Stage::Decode, decode);
                }
                self.metrics.stage(Stage::Queue, captured.arrived.elapsed());
                if !due {
                    return Analysed {
                        captured,
                        scores: None,
                        model: None,
                        inference: Duration::ZERO,
                        batch: 0,
                    };
                }
                let (scores, inference, batch) = self.score(&captured, participant, model);
                Analysed {
                    captured,
                    scores: Some(scores),
                    model: Some(Arc::clone(model)),
                    inference,
                    batch,
                }
            });
            if !intake.hand_on(number, item) || end {
                return false;
            }
        }
    }

    /// Preprocesses and scores one frame; returns the engine time and batch size with the result.
    fn score(
        &mut self,
        captured: &Captured,
        participant: &Participant,
        model: &Model,
    ) -> (Result<Scores, ScoreError>, Duration, usize) {
        let started = Instant::now();
        let on_gpu = self.preprocess_on_gpu(captured, model);
        if !on_gpu {
            let size = model.manifest.model.input_size;
            self.input.resize(3 * size[0] * size[1], 0.0);
            preprocess::frame_to_chw(
                &captured.frame,
                size,
                &model.manifest.normalisation,
                &mut self.input,
            );
        }
        self.metrics.stage(Stage::Preprocess, started.elapsed());
        // The engine time is the call's (this frame's and the others in its batch), from when
        // the session was free: another analyser, or another camera's, may hold it meanwhile.
        let input = match self.device_input(on_gpu) {
            Ok(Some(input)) => input,
            Ok(None) => Input::Host(std::mem::take(&mut self.input)),
            Err(e) => return (Err(e), Duration::ZERO, 0),
        };
        let outcome = participant.score(input);
        let (scores, inference, batch) = (outcome.scores, outcome.inference, outcome.batch);
        if let Some(values) = outcome.input.into_host() {
            self.input = values;
        }
        if scores.is_ok() {
            self.metrics.analysed(inference, batch);
            self.metrics.stage(Stage::Inference, inference);
        }
        (scores, inference, batch)
    }

    /// Preprocesses the frame on the GPU when this camera has a GPU stage; false means the host
    /// path does it. A GPU failure is said once and hands the camera to the host path.
    #[cfg(feature = "gpu")]
    fn preprocess_on_gpu(&mut self, captured: &Captured, model: &Model) -> bool {
        let Some(stage) = self.gpu.as_mut() else {
            return false;
        };
        match stage.preprocess(&captured.frame, &model.manifest) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("GPU preprocessing failed ({e}); this camera continues on the CPU");
                self.gpu = None;
                false
            }
        }
    }

    #[cfg(not(feature = "gpu"))]
    fn preprocess_on_gpu(&mut self, _captured: &Captured, _model: &Model) -> bool {
        false
    }

    /// The input the GPU stage left on the device, when the frame was preprocessed there.
    #[cfg(feature = "gpu")]
    fn device_input(&self, on_gpu: bool) -> Result<Option<Input>, ScoreError> {
        match (&self.gpu, on_gpu) {
            (Some(stage), true) => stage.device_input().map(|input| Some(Input::Device(input))),
            (None, true) => Err(ScoreError::Gpu("no GPU stage for this camera".into())),
            (_, false) => Ok(None),
        }
    }

    #[cfg(not(feature = "gpu"))]
    fn device_input(&self, _on_gpu: bool) -> Result<Option<Input>, ScoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::RgbFrame;

    fn captured(index: u64) -> Captured {
        Captured {
            frame: RgbFrame {
                width: 1,
                height: 1,
                pixels: vec![0; 3],
            },
            pts: Duration::from_millis(40 * index),
            fps: 25.0,
            arrived: Instant::now(),
            decode: None,
        }
    }

    fn intake_of(frames: u64, end: bool, max_fps: f64) -> (Arc<Intake>, Arc<FrameQueue<Analysed>>) {
        let input = Arc::new(FrameQueue::new(frames as usize + 1));
        for index in 0..frames {
            input.push_drop_oldest(Item::Frame(captured(index)));
        }
        if end {
            input.push_drop_oldest(Item::End);
        }
        let output = Arc::new(FrameQueue::new(1));
        let intake = Arc::new(Intake::new(input, Arc::clone(&output), max_fps));
        (intake, output)
    }

    /// What an analyser does with a ticket, less the engine: a varying delay, then hand it on.
    fn analyse_slowly(intake: Arc<Intake>, seed: u64) {
        while let Next::Ticket(Ticket { number, item, due }) = intake.take(&|| false) {
            let end = matches!(item, Item::End);
            std::thread::sleep(Duration::from_millis((number * 7 + seed) % 5));
            let item = item.map(|captured| Analysed {
                captured,
                scores: due.then_some(Err(ScoreError::Runner("no engine in this test"))),
                model: None,
                inference: Duration::ZERO,
                batch: 0,
            });
            if !intake.hand_on(number, item) || end {
                return;
            }
        }
    }

    #[test]
    fn analysers_hand_frames_on_in_the_order_they_were_taken() {
        let (intake, output) = intake_of(40, true, 0.0);
        let analysers: Vec<_> = (0..3)
            .map(|seed| {
                let intake = Arc::clone(&intake);
                std::thread::spawn(move || analyse_slowly(intake, seed))
            })
            .collect();
        let mut seen = Vec::new();
        loop {
            match output.pop(Duration::from_secs(5)) {
                Some(Item::Frame(analysed)) => {
                    assert!(
                        analysed.scores.is_some(),
                        "every frame is due without max_fps"
                    );
                    seen.push(analysed.captured.pts);
                }
                Some(Item::End) => break,
                Some(_) => {}
                None => panic!("the analysers stalled after {} frames", seen.len()),
            }
        }
        for analyser in analysers {
            assert!(
                analyser.join().is_ok(),
                "every analyser ends after the end marker"
            );
        }
        let expected: Vec<Duration> = (0..40).map(|i| Duration::from_millis(40 * i)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn max_fps_is_kept_across_analysers() {
        // 25 frames/s in, at most 12.5 analysed: every other frame is due.
        let (intake, _output) = intake_of(10, true, 12.5);
        let due: Vec<bool> = std::iter::from_fn(|| match intake.take(&|| false) {
            Next::Ticket(ticket) => Some(ticket),
            _ => None,
        })
        .filter(|ticket| matches!(ticket.item, Item::Frame(_)))
        .map(|ticket| ticket.due)
        .collect();
        assert_eq!(
            due,
            [
                true, false, true, false, true, false, true, false, true, false
            ]
        );
    }

    #[test]
    fn a_camera_without_frames_lets_its_analyser_move_to_a_new_model() {
        let (intake, _output) = intake_of(0, false, 0.0);
        let swap = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiting = {
            let (intake, swap) = (Arc::clone(&intake), Arc::clone(&swap));
            std::thread::spawn(move || {
                matches!(
                    intake.take(&|| swap.load(std::sync::atomic::Ordering::Relaxed)),
                    Next::Swapped
                )
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let swapped_at = Instant::now();
        swap.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            waiting.join().ok(),
            Some(true),
            "it went on waiting for a frame"
        );
        assert!(swapped_at.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn analysers_stop_when_the_worker_is_gone() {
        let (intake, output) = intake_of(3, false, 0.0);
        drop(output);
        let started = Instant::now();
        let analyser = {
            let intake = Arc::clone(&intake);
            std::thread::spawn(move || analyse_slowly(intake, 0))
        };
        assert!(analyser.join().is_ok());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
