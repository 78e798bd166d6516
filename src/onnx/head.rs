//! The defect head's nodes (`model::head`): its input features from the L2-normalised teacher taps,
//! the two-layer perceptron as 1×1 Convs with the logit's standardisation and weight folded into
//! the second, upsampled to the fusion stride. Stays fp32 in the INT8 graph: it reads no backbone
//! tensor directly.

use super::graph::{GraphBuilder, attr_int, attr_ints};
use crate::model::head::Head;

/// The head's term of the map, `factor` times finer than the head's stride-8 grid.
pub(super) fn head_term(
    g: &mut GraphBuilder,
    teacher_hat: &[String; 3],
    head: &Head,
    factor: usize,
) -> String {
    let pooled = g.node(
        "AveragePool",
        &[&teacher_hat[0]],
        vec![
            attr_ints("kernel_shape", &[2, 2]),
            attr_ints("strides", &[2, 2]),
        ],
        "head_pool",
    );
    let up = g.upsample(&teacher_hat[2], 2);
    let side_by_side = g.node(
        "Concat",
        &[&pooled, &teacher_hat[1], &up],
        vec![attr_int("axis", 1)],
        "head_input",
    );
    let context = g.node(
        "AveragePool",
        &[&side_by_side],
        vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_ints("strides", &[1, 1]),
            attr_ints("pads", &[1, 1, 1, 1]),
            attr_int("count_include_pad", 0),
        ],
        "head_context",
    );
    let one_by_one = || vec![attr_ints("kernel_shape", &[1, 1])];
    let w1 = g.float_initializer("head_w1", &[head.hidden, head.inputs, 1, 1], &head.w1);
    let b1 = g.float_initializer("head_b1", &[head.hidden], &head.b1);
    let hidden = g.node("Conv", &[&context, &w1, &b1], one_by_one(), "head_hidden");
    let hidden = g.relu(&hidden);
    // weight · (w2·h + b2 − mean) / std as one Conv.
    let scale = head.weight / head.logit_std.max(f32::EPSILON);
    let w2: Vec<f32> = head.w2.iter().map(|w| w * scale).collect();
    let b2 = (head.b2 - head.logit_mean) * scale;
    let w2 = g.float_initializer("head_w2", &[1, head.hidden, 1, 1], &w2);
    let b2 = g.float_initializer("head_b2", &[1], &[b2]);
    let logit = g.node("Conv", &[&hidden, &w2, &b2], one_by_one(), "head_term");
    g.upsample(&logit, factor)
}
