//! The anomaly map: how the per-scale distances (`features`) and the defect head (`head`) become
//! one map (`MapOptions`), fused, blurred and upsampled, and the image score. Shared by training
//! and by the export parity checks; the exported graph (`onnx`) builds the same map.

use burn::prelude::*;

use super::features::{
    Fusion, MapStats, Pyramid, ScaleWhitening, Whitening, gaussian_blur, scale_distance,
    standardised_terms, upsample,
};
use super::head::Head;

/// How the per-scale distances become one anomaly map.
#[derive(Debug, Clone, PartialEq)]
pub struct MapOptions {
    pub fusion: Fusion,
    /// Standard deviation in pixels of the Gaussian blur applied to the fused map (0: none).
    pub blur_sigma: f32,
    /// Term statistics for [`Fusion::Standardised`] and [`Fusion::Whitened`] (ignored by the
    /// other fusions).
    pub stats: MapStats,
    /// The residual whitening of [`Fusion::Whitened`] (ignored by the other fusions; when absent,
    /// the identity for each scale's channel count).
    pub whitening: Option<Whitening>,
    /// Terms are fused and blurred at 1/`fusion_stride` of the input size, then upsampled once: 1
    /// (bundles before it was recorded) or [`FUSION_STRIDE`] (1, 2 or 4: it must divide the
    /// smallest term stride).
    pub fusion_stride: usize,
    /// The defect head, whose standardised logit is added to the fused map before the blur.
    pub head: Option<Head>,
}

/// Where new bundles fuse and blur the map: at stride 4, the finest feature map, so that the
/// blur and the sums run on 1/16 of the pixels (the map is the same to within the bilinear
/// interpolation; AUROCs in docs/results.md).
pub const FUSION_STRIDE: usize = 4;

/// Fusion strides a graph can be built with (divisors of the smallest term stride, 4).
pub const FUSION_STRIDES: [usize; 3] = [1, 2, 4];

impl MapOptions {
    /// The whitening the terms use: `None` unless the fusion is [`Fusion::Whitened`], the identity
    /// for `channels` when that fusion has none.
    pub fn term_whitening(&self, channels: [usize; 3]) -> Option<Whitening> {
        (self.fusion == Fusion::Whitened).then(|| {
            self.whitening
                .clone()
                .unwrap_or_else(|| Whitening(channels.map(ScaleWhitening::identity)))
        })
    }
}

/// The anomaly map [N, 1, H, W]: per-scale distances upsampled to `size / fusion_stride`, fused,
/// blurred there (σ / fusion_stride) and upsampled to `size`.
pub fn anomaly_map(
    teacher: &Pyramid,
    student: &Pyramid,
    size: [usize; 2],
    options: &MapOptions,
) -> Tensor<4> {
    let low = fusion_size(size, options);
    let fused = if options.fusion.standardises() {
        let whitening = options.term_whitening(teacher.channels());
        standardise(teacher, student, low, &options.stats, whitening.as_ref())
    } else {
        fuse(teacher, student, low, options.fusion)
    };
    let fused = match &options.head {
        Some(head) => fused + head.term(teacher, low),
        None => fused,
    };
    finish(fused, size, options)
}

/// Where the terms are fused: 1/`fusion_stride` of `size`.
pub fn fusion_size(size: [usize; 2], options: &MapOptions) -> [usize; 2] {
    let stride = options.fusion_stride.max(1);
    [size[0] / stride, size[1] / stride]
}

/// The last step of [`anomaly_map`]: a map at [`fusion_size`] blurred there (σ / fusion_stride)
/// and upsampled to `size`. Linear, so it also gives any one term's share of the final map.
pub fn finish(fused: Tensor<4>, size: [usize; 2], options: &MapOptions) -> Tensor<4> {
    let stride = options.fusion_stride.max(1);
    upsample(
        gaussian_blur(fused, options.blur_sigma / stride as f32),
        size,
    )
}

fn standardise(
    teacher: &Pyramid,
    student: &Pyramid,
    size: [usize; 2],
    stats: &MapStats,
    whitening: Option<&Whitening>,
) -> Tensor<4> {
    let mut fused: Option<Tensor<4>> = None;
    for (index, term) in standardised_terms(teacher, student, whitening)
        .into_iter()
        .enumerate()
    {
        let z = upsample(term, size)
            .sub_scalar(stats.mean[index])
            .div_scalar(stats.divisor(index));
        fused = Some(match fused {
            Some(acc) => acc + z,
            None => z,
        });
    }
    fused.expect("four terms")
}

fn fuse(teacher: &Pyramid, student: &Pyramid, size: [usize; 2], fusion: Fusion) -> Tensor<4> {
    let mut fused: Option<Tensor<4>> = None;
    for (t, s) in teacher.0.iter().zip(student.0.iter()) {
        let map = upsample(scale_distance(t.clone(), s.clone()), size);
        fused = Some(match (fused, fusion) {
            (None, _) => map,
            (Some(acc), Fusion::Product) => acc * map,
            (Some(acc), _) => acc + map,
        });
    }
    fused.expect("a pyramid has three scales")
}

/// Image score: the maximum of each map, [N].
pub fn image_score(map: Tensor<4>) -> Tensor<1> {
    let [n, _, _, _] = map.dims();
    map.reshape([n as i64, -1]).max_dim(1).reshape([n])
}
