//! What `stpm train` loads before its first step: the frozen teacher, the images (preprocessed,
//! with their augmented copies), the teacher's features of every image computed once, and the
//! training / held-out split.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use prost::Message;

use super::{Augment, CHECKPOINT_IMAGES, DEFAULT_TEACHER, TeacherWeights, TrainConfig, TrainError};
use crate::bundle;
use crate::dataset::{self, split_holdout};
use crate::model::features::{self, Pyramid};
use crate::model::weights;
use crate::model::{Backbone, BackboneKind, compute_device};
use crate::onnx;
use crate::preprocess::{self, Normalisation, RgbFrame};
use crate::rng::SplitMix;

/// Loads (or randomly initialises) the frozen teacher on the plain compute device.
pub(super) fn load_teacher(
    config: &TrainConfig,
    device: &Device,
) -> Result<(Backbone, String, PathBuf), TrainError> {
    match &config.teacher {
        TeacherWeights::Random => Ok((
            config
                .backbone
                .init_seeded(device, config.seed ^ 0x7EAC_4E55),
            "random".to_string(),
            PathBuf::from("random"),
        )),
        TeacherWeights::File(path) => {
            let path = if path.as_path() == Path::new(DEFAULT_TEACHER) {
                if config.backbone != BackboneKind::EfficientNetLite0 {
                    return Err(TrainError::TeacherRequired {
                        backbone: config.backbone,
                    });
                }
                crate::paths::find_installed(DEFAULT_TEACHER)
                    .map_err(TrainError::NoDefaultTeacher)?
            } else {
                path.clone()
            };
            let teacher = weights::load_backbone(config.backbone, &path, device)?;
            let hash = bundle::sha256_file(&path)?;
            Ok((teacher, hash, path))
        }
    }
}

/// Preprocessed images held in memory as CHW float32.
pub(super) struct ImageSet {
    pub(super) pixels: Vec<Vec<f32>>,
}

impl ImageSet {
    pub(super) fn load(
        paths: &[PathBuf],
        size: usize,
        norm: &Normalisation,
    ) -> Result<Self, TrainError> {
        let pixels = paths
            .iter()
            .map(|path| {
                Ok(preprocess::to_chw(
                    &RgbFrame::open(path)?,
                    [size, size],
                    norm,
                ))
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(Self { pixels })
    }

    /// Appends the left-right, top-bottom and both-ways mirror images of image `index` (CHW,
    /// `size`²); returns their indices.
    pub(super) fn add_flips(&mut self, index: usize, size: usize) -> [usize; 3] {
        let mut added = [0; 3];
        // Left-right: mirrored; top-bottom: mirrored and half a turn; both ways: half a turn.
        for (slot, (quarter_turns, mirror)) in
            added.iter_mut().zip([(0, true), (2, true), (2, false)])
        {
            let flipped = turn(&self.pixels[index], size, quarter_turns, mirror);
            *slot = self.pixels.len();
            self.pixels.push(flipped);
        }
        added
    }

    pub(super) fn batch(&self, indices: &[usize], size: usize, device: &Device) -> Tensor<4> {
        let mut flat = Vec::with_capacity(indices.len() * 3 * size * size);
        for &i in indices {
            flat.extend_from_slice(&self.pixels[i]);
        }
        Tensor::from_data(
            TensorData::new(flat, [indices.len(), 3, size, size]),
            device,
        )
    }
}

/// A CHW image turned by `quarter_turns` × 90° and optionally mirrored left-right (square only).
pub(super) fn turn(image: &[f32], size: usize, quarter_turns: usize, mirror: bool) -> Vec<f32> {
    let mut out = vec![0.0; image.len()];
    for (plane_out, plane_in) in out
        .chunks_exact_mut(size * size)
        .zip(image.chunks_exact(size * size))
    {
        for y in 0..size {
            for x in 0..size {
                let mx = if mirror { size - 1 - x } else { x };
                let (sy, sx) = match quarter_turns % 4 {
                    0 => (y, mx),
                    1 => (size - 1 - mx, y),
                    2 => (size - 1 - y, size - 1 - mx),
                    _ => (mx, size - 1 - y),
                };
                plane_out[y * size + x] = plane_in[sy * size + sx];
            }
        }
    }
    out
}

/// Frozen-teacher features of every image (augmented copies included), computed once.
pub(super) struct FeatureCache {
    /// Per scale: per image, the flattened [C, h, w] features.
    pub(super) scales: [Vec<Vec<f32>>; 3],
    pub(super) dims: [[usize; 3]; 3],
}

/// The teacher alone in ONNX Runtime (its part of the bundle's graph, from the same exporter; 150
/// images at 256² took 0.9–1.2 s against 5.8 s with burn's forward on 2 cores), opened once for
/// any number of image sets.
pub(super) struct TeacherRunner {
    probe: crate::engine::Probe,
    taps: [String; 3],
    dims: [[usize; 3]; 3],
}

impl TeacherRunner {
    pub(super) fn open(teacher: &Backbone, size: usize) -> Result<Self, TrainError> {
        let (model, taps) = onnx::teacher_model(teacher, [size, size]);
        let probe = crate::engine::Probe::open(
            &model.encode_to_vec(),
            [size, size],
            Path::new("the teacher graph"),
        )?;
        let channels = teacher.kind().tap_channels();
        let dims = std::array::from_fn(|scale| {
            [channels[scale], size >> (scale + 2), size >> (scale + 2)]
        });
        Ok(Self { probe, taps, dims })
    }

    /// The teacher's features of every image of `images`.
    pub(super) fn features(&mut self, images: &ImageSet) -> Result<FeatureCache, TrainError> {
        let dims = self.dims;
        let mut scales: [Vec<Vec<f32>>; 3] = Default::default();
        let mut wrong_size = None;
        for image in &images.pixels {
            self.probe.run(image, &self.taps, |scale, values| {
                let [c, h, w] = dims[scale];
                if values.len() != c * h * w {
                    wrong_size = Some((scale, values.len(), c * h * w));
                }
                scales[scale].push(values.to_vec());
            })?;
        }
        if let Some((scale, got, expected)) = wrong_size {
            return Err(TrainError::Invalid(format!(
                "the teacher graph's stride-{} features have {got} values, expected {expected}",
                4 << scale
            )));
        }
        Ok(FeatureCache { scales, dims })
    }
}

impl FeatureCache {
    /// The teacher's features of `images`, through a [`TeacherRunner`] of its own.
    pub(super) fn compute(
        teacher: &Backbone,
        images: &ImageSet,
        size: usize,
    ) -> Result<Self, TrainError> {
        TeacherRunner::open(teacher, size)?.features(images)
    }

    pub(super) fn batch(&self, indices: &[usize], device: &Device) -> Pyramid {
        let tensor = |scale: usize| {
            let [c, h, w] = self.dims[scale];
            let mut flat = Vec::with_capacity(indices.len() * c * h * w);
            for &i in indices {
                flat.extend_from_slice(&self.scales[scale][i]);
            }
            Tensor::from_data(TensorData::new(flat, [indices.len(), c, h, w]), device)
        };
        Pyramid([tensor(0), tensor(1), tensor(2)])
    }
}

/// Everything loaded before the first step: images, frozen teacher, its cached features, the split.
pub(super) struct Prepared {
    pub(super) folder: PathBuf,
    /// Images the folder held (more than are used when `max_images` took a share).
    pub(super) images_found: usize,
    pub(super) norm: Normalisation,
    pub(super) device: Device,
    pub(super) teacher: Backbone,
    pub(super) teacher_hash: String,
    pub(super) teacher_path: PathBuf,
    pub(super) images: ImageSet,
    pub(super) cache: FeatureCache,
    pub(super) train_idx: Vec<usize>,
    pub(super) holdout_idx: Vec<usize>,
    /// Per image index: the indices of its augmented copies in `images` (empty without
    /// augmentation and for held-out images).
    pub(super) variants: Vec<Vec<usize>>,
}

impl Prepared {
    pub(super) fn load(config: &TrainConfig) -> Result<Self, TrainError> {
        let dataset::TrainingSelection {
            folder,
            found: images_found,
            paths,
        } = dataset::training_selection(&config.data, config.max_images)?;
        if config.progress && paths.len() < images_found {
            log::info!(
                "{} holds {images_found} images: training on {} of them, evenly spaced in name order (--max-images)",
                folder.display(),
                paths.len()
            );
        }
        if paths.len() < 2 {
            return Err(TrainError::TooFewImages {
                folder,
                found: paths.len(),
            });
        }
        let (mean, std) = config.backbone.normalisation();
        let norm = Normalisation { mean, std };
        let device = compute_device();
        let (teacher, teacher_hash, teacher_path) = load_teacher(config, &device)?;
        let (train_idx, holdout_idx) =
            split_holdout(paths.len(), config.holdout_fraction, config.seed);
        let mut images = ImageSet::load(&paths, config.image_size, &norm)?;
        let mut variants = vec![Vec::new(); paths.len()];
        if config.augment == Augment::Flips {
            for &i in &train_idx {
                variants[i] = images.add_flips(i, config.image_size).to_vec();
            }
        }
        let cache_started = Instant::now();
        let cache = FeatureCache::compute(&teacher, &images, config.image_size)?;
        if config.progress {
            log::info!(
                "teacher features of {} images cached in {:.1} s",
                images.pixels.len(),
                cache_started.elapsed().as_secs_f64()
            );
        }
        Ok(Self {
            folder,
            images_found,
            norm,
            device,
            teacher,
            teacher_hash,
            teacher_path,
            images,
            cache,
            train_idx,
            holdout_idx,
            variants,
        })
    }

    /// The image a training step uses for image `index`: itself or one of its augmented copies.
    pub(super) fn draw_variant(&self, index: usize, rng: &mut SplitMix) -> usize {
        match self.variants.get(index) {
            Some(copies) if !copies.is_empty() => {
                let pick = (rng.next_u64() % (copies.len() as u64 + 1)) as usize;
                copies.get(pick).copied().unwrap_or(index)
            }
            _ => index,
        }
    }

    /// The STPM loss over the held-out images (mean over images): the checkpoint criterion. The mean
    /// distance tracks how well the student has converged everywhere; an image's maximum, by contrast,
    /// is dominated by a few positions and rose while the loss fell in our runs.
    pub(super) fn holdout_loss(&self, student: &Backbone, config: &TrainConfig) -> f32 {
        let size = config.image_size;
        let mut total = 0.0;
        let images = &self.holdout_idx[..self.holdout_idx.len().min(CHECKPOINT_IMAGES)];
        for chunk in images.chunks(8) {
            let student_pyramid = student.pyramid(self.images.batch(chunk, size, &self.device));
            let loss = features::loss(&self.cache.batch(chunk, &self.device), &student_pyramid);
            total += loss.into_scalar::<f32>() * chunk.len() as f32;
        }
        total / images.len().max(1) as f32
    }

    /// Teacher and student pyramids of the held-out images, in batches of 8: what the map's
    /// statistics are measured on (computed once for the whitening and the term statistics).
    pub(super) fn holdout_pyramids(
        &self,
        student: &Backbone,
        config: &TrainConfig,
    ) -> Vec<(Pyramid, Pyramid)> {
        self.holdout_idx
            .chunks(8)
            .map(|chunk| {
                let images = self.images.batch(chunk, config.image_size, &self.device);
                (
                    self.cache.batch(chunk, &self.device),
                    student.pyramid(images),
                )
            })
            .collect()
    }
}
