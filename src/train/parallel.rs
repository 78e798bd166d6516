//! Data-parallel gradient steps: each batch is split into contiguous shards, one per long-lived
//! worker thread, and their gradients are summed. Worker k always gets shard k, so results do not
//! depend on scheduling (BatchNorm statistics are per shard, averaged across workers by burn).

use std::sync::mpsc::{self, Receiver, Sender};

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use super::Prepared;
use crate::model::Backbone;
use crate::model::features;

type Job = (Backbone, Vec<usize>, f32);
type Outcome = (GradientsParams, f32);

struct Worker {
    jobs: Sender<Job>,
    results: Receiver<Outcome>,
}

/// Loss and gradients of one shard, its loss weighted so that shard losses sum to the batch mean.
fn shard_gradients(
    data: &Prepared,
    student: &Backbone,
    indices: &[usize],
    weight: f32,
    size: usize,
    device: &Device,
) -> Outcome {
    let teacher = data.cache.batch(indices, device);
    let output = student.pyramid(data.images.batch(indices, size, device));
    let loss = features::loss(&teacher, &output).mul_scalar(weight);
    let value = loss.clone().into_scalar::<f32>();
    (GradientsParams::from_grads(loss.backward(), student), value)
}

/// A fixed set of gradient workers living for one training run.
pub(super) struct GradientWorkers<'scope> {
    workers: Vec<Worker>,
    data: &'scope Prepared,
    size: usize,
    device: Device,
}

impl GradientWorkers<'_> {
    /// Gradients of the mean STPM loss over `batch` (summed over shards) and that loss.
    pub(super) fn gradients(&self, student: &Backbone, batch: &[usize]) -> Outcome {
        // Even a single shard goes to worker 0: BatchNorm running statistics are kept per thread
        // and averaged, so the set of threads touching them must not change from step to step.
        let shards = self.workers.len().min(batch.len()).max(1);
        let shard_len = batch.len().div_ceil(shards);
        let chunks: Vec<&[usize]> = batch.chunks(shard_len).collect();
        let mut sent = 0;
        for (worker, chunk) in self.workers.iter().zip(&chunks) {
            let weight = chunk.len() as f32 / batch.len() as f32;
            if worker
                .jobs
                .send((student.clone(), chunk.to_vec(), weight))
                .is_ok()
            {
                sent += 1;
            }
        }
        let mut accumulator = GradientsAccumulator::<Backbone>::new();
        let mut loss = 0.0;
        for (worker, chunk) in self.workers.iter().zip(&chunks).take(chunks.len()) {
            // A worker that died (it cannot, short of a panic) is replaced by doing its shard here.
            let (grads, value) = match (sent >= chunks.len())
                .then(|| worker.results.recv().ok())
                .flatten()
            {
                Some(outcome) => outcome,
                None => {
                    let weight = chunk.len() as f32 / batch.len() as f32;
                    shard_gradients(self.data, student, chunk, weight, self.size, &self.device)
                }
            };
            accumulator.accumulate(student, grads);
            loss += value;
        }
        (accumulator.grads(), loss)
    }
}

/// Runs `body` with `count` gradient workers (1 means: compute on the calling thread).
pub(super) fn with_workers<R>(
    count: usize,
    data: &Prepared,
    size: usize,
    device: &Device,
    body: impl FnOnce(&GradientWorkers<'_>) -> R,
) -> R {
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for _ in 0..count.max(1) {
            let (jobs, job_rx) = mpsc::channel::<Job>();
            let (result_tx, results) = mpsc::channel::<Outcome>();
            let worker_device = device.clone();
            scope.spawn(move || {
                for (student, indices, weight) in job_rx {
                    let outcome =
                        shard_gradients(data, &student, &indices, weight, size, &worker_device);
                    if result_tx.send(outcome).is_err() {
                        break;
                    }
                }
            });
            workers.push(Worker { jobs, results });
        }
        let workers = GradientWorkers {
            workers,
            data,
            size,
            device: device.clone(),
        };
        // Dropping `workers` closes the job channels, which ends the threads before the scope joins them.
        body(&workers)
    })
}
