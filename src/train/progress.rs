//! `stpm train --progress-file`: how far a training run is, as a small JSON file rewritten (by
//! rename, so a reader never sees half of one) about once a second, for a supervisor such as a
//! running `stpm run` (`POST /api/train`) that started it as a child process.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often the file is rewritten during the steps.
const INTERVAL: Duration = Duration::from_secs(1);

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    /// `preparing` (reading images, caching the teacher's features), `training` (the steps),
    /// `writing` (export, calibration, the bundle), `done`.
    pub phase: String,
    pub epoch: usize,
    pub epochs: usize,
    /// Steps done and planned in all.
    pub step: usize,
    pub steps: usize,
    /// Mean training loss of the current epoch so far.
    pub loss: Option<f32>,
    pub elapsed_seconds: f64,
    /// Until the last step, from the pace of the steps so far (`None` before the first).
    pub eta_seconds: Option<f64>,
}

/// Writes [`TrainProgress`] to a file, at most once per [`INTERVAL`] unless forced.
pub struct ProgressFile {
    path: Option<PathBuf>,
    started: Instant,
    /// When the steps began, for the estimate.
    steps_started: Option<Instant>,
    last: Option<Instant>,
    pub state: TrainProgress,
}

impl ProgressFile {
    /// Writes to `path` (nothing when `None`).
    pub fn new(path: Option<&Path>) -> Self {
        Self {
            path: path.map(Path::to_path_buf),
            started: Instant::now(),
            steps_started: None,
            last: None,
            state: TrainProgress::default(),
        }
    }

    /// A new phase, written at once.
    pub fn phase(&mut self, phase: &str) {
        self.state.phase = phase.to_string();
        if phase == "training" {
            self.steps_started = Some(Instant::now());
        }
        self.write(true);
    }

    /// One step done: `step` of `steps` in all, in `epoch` of `epochs`, the epoch's mean loss.
    pub fn step(&mut self, epoch: usize, epochs: usize, step: usize, steps: usize, loss: f32) {
        self.state.epoch = epoch;
        self.state.epochs = epochs;
        self.state.step = step;
        self.state.steps = steps;
        self.state.loss = loss.is_finite().then_some(loss);
        if let Some(started) = self.steps_started
            && step > 0
        {
            let per_step = started.elapsed().as_secs_f64() / step as f64;
            self.state.eta_seconds = Some(per_step * steps.saturating_sub(step) as f64);
        }
        self.write(step == steps);
    }

    fn write(&mut self, force: bool) {
        let Some(path) = &self.path else {
            return;
        };
        if !force && self.last.is_some_and(|last| last.elapsed() < INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        self.state.elapsed_seconds = self.started.elapsed().as_secs_f64();
        let written = serde_json::to_vec(&self.state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::files::write_whole(path, bytes));
        if let Err(e) = written {
            // Progress is a courtesy: training goes on without it.
            log::warn!("cannot write the progress file {}: {e}", path.display());
            self.path = None;
        }
    }
}

/// The progress in `path`, when it holds one.
pub fn read(path: &Path) -> Option<TrainProgress> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_says_the_phase_steps_and_an_estimate() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("progress.json");
        let mut file = ProgressFile::new(Some(&path));
        file.phase("preparing");
        assert_eq!(read(&path).map(|p| p.phase), Some("preparing".into()));
        file.phase("training");
        std::thread::sleep(Duration::from_millis(20));
        file.step(1, 2, 1, 4, 0.5);
        file.step(2, 2, 4, 4, 0.25);
        let last = read(&path).expect("progress");
        assert_eq!((last.epoch, last.step, last.steps), (2, 4, 4));
        assert_eq!(last.loss, Some(0.25));
        assert_eq!(last.eta_seconds, Some(0.0));
        assert!(!dir.path().join("progress.json.part").exists());
        // Without a path nothing is written and nothing fails.
        ProgressFile::new(None).phase("done");
    }
}
