//! The ONNX graph writer: the protobuf types, a small graph builder, and a bundle's `model.onnx`
//! (teacher and student side by side in ONE graph with BatchNorm folded, the STPM scoring inside
//! it) with its tensor names. Low level: training and the engine use it; it runs nothing.

pub mod graph;
mod head;
pub mod proto;

use std::path::{Path, PathBuf};

use prost::Message;

use crate::model::efficientnet::{EfficientNetLite, TAP_BLOCKS};
use crate::model::features::{
    MAGNITUDE_EPS, NORM_EPS, STANDARDISED_STRIDES, STANDARDISED_TERMS, ScaleWhitening, Whitening,
    gaussian_kernel,
};
use crate::model::head::HEAD_STRIDE;
use crate::model::map::MapOptions;
use crate::model::resnet::ResNet18;
use crate::model::{Backbone, Fusion};
use graph::{GraphBuilder, float_value_info};
use proto::{GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// ONNX opset of the exported graph (ReduceMax still takes `axes` as an attribute here).
pub const OPSET: i64 = 17;
/// IR version matching opset 17.
pub const IR_VERSION: i64 = 8;
/// Names of the graph's input and outputs (the bundle contract).
pub const INPUT_NAME: &str = "image";
pub const MAP_OUTPUT: &str = "anomaly_map";
pub const SCORE_OUTPUT: &str = "score";
/// Name prefix of the weight of each scale's whitening Conv (`whitened` fusion), by which the INT8
/// export finds those Convs to fit them again.
pub const WHITEN_WEIGHT: &str = "whiten_w";

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("teacher ({teacher}) and student ({student}) must share one architecture")]
    ArchitectureMismatch { teacher: String, student: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn lite_pyramid(
    g: &mut GraphBuilder,
    net: &EfficientNetLite,
    input: &str,
    tag: &str,
) -> [String; 3] {
    let stem = g.conv_bn(
        input,
        &net.conv_stem,
        Some(&net.bn0),
        &format!("{tag}_stem"),
    );
    let mut x = g.relu6(&stem);
    let mut taps = Vec::with_capacity(3);
    for (index, block) in net.blocks.iter().enumerate().take(TAP_BLOCKS[2] + 1) {
        let prefix = format!("{tag}_b{index}");
        let block_input = x.clone();
        if let (Some(conv), Some(bn)) = (&block.expand_conv, &block.bn0) {
            let expanded = g.conv_bn(&x, conv, Some(bn), &format!("{prefix}_expand"));
            x = g.relu6(&expanded);
        }
        let depthwise = g.conv_bn(
            &x,
            &block.depthwise_conv,
            Some(&block.bn1),
            &format!("{prefix}_dw"),
        );
        x = g.relu6(&depthwise);
        x = g.conv_bn(
            &x,
            &block.project_conv,
            Some(&block.bn2),
            &format!("{prefix}_project"),
        );
        if block.residual {
            x = g.binary("Add", &x, &block_input);
        }
        if TAP_BLOCKS.contains(&index) {
            taps.push(x.clone());
        }
    }
    [taps[0].clone(), taps[1].clone(), taps[2].clone()]
}

fn resnet_pyramid(g: &mut GraphBuilder, net: &ResNet18, input: &str, tag: &str) -> [String; 3] {
    let stem = g.conv_bn(input, &net.conv1, Some(&net.bn1), &format!("{tag}_conv1"));
    let stem = g.relu(&stem);
    let mut x = g.max_pool(&stem, 3, 2, 1, &format!("{tag}_maxpool"));
    let mut taps = Vec::with_capacity(3);
    for (layer_index, layer) in [&net.layer1, &net.layer2, &net.layer3]
        .into_iter()
        .enumerate()
    {
        for (block_index, block) in layer.iter().enumerate() {
            let prefix = format!("{tag}_l{}_{block_index}", layer_index + 1);
            let y = g.conv_bn(&x, &block.conv1, Some(&block.bn1), &format!("{prefix}_c1"));
            let y = g.relu(&y);
            let y = g.conv_bn(&y, &block.conv2, Some(&block.bn2), &format!("{prefix}_c2"));
            let shortcut = match &block.downsample {
                Some(down) => g.conv_bn(&x, &down.conv, Some(&down.bn), &format!("{prefix}_down")),
                None => x.clone(),
            };
            let sum = g.binary("Add", &y, &shortcut);
            x = g.relu(&sum);
        }
        taps.push(x.clone());
    }
    [taps[0].clone(), taps[1].clone(), taps[2].clone()]
}

fn pyramid(g: &mut GraphBuilder, net: &Backbone, input: &str, tag: &str) -> [String; 3] {
    match net {
        Backbone::EfficientNetLite0(net) => lite_pyramid(g, net, input, tag),
        Backbone::ResNet18(net) => resnet_pyramid(g, net, input, tag),
    }
}

/// The low-resolution terms of the map, each with its stride: per scale ½‖t̂ − ŝ‖² (or, with
/// `whitening`, ‖W(t̂ − ŝ) − Wμ‖² as a 1×1 Conv), plus for the standardising fusions the stride-4
/// (½ ln Σs² − ½ ln Σt²)² (as `features::standardised_terms`).
fn distance_terms(
    g: &mut GraphBuilder,
    teacher_taps: &[String; 3],
    teacher_hat: &[String; 3],
    student_taps: &[String; 3],
    channels: [usize; 3],
    fusion: Fusion,
    whitening: Option<&Whitening>,
) -> Vec<(String, usize)> {
    let mut terms = Vec::with_capacity(STANDARDISED_TERMS);
    for (scale, (t_hat, s)) in teacher_hat.iter().zip(student_taps.iter()).enumerate() {
        let c = channels[scale];
        let s_hat = g.l2_normalize(s, c, NORM_EPS as f32);
        let diff = g.binary("Sub", t_hat, &s_hat);
        let term = match whitening {
            Some(w) => {
                let whitened = whiten(g, &diff, &w.0[scale]);
                let squared = g.binary("Mul", &whitened, &whitened);
                g.channel_sum(&squared, c)
            }
            None => {
                let squared = g.binary("Mul", &diff, &diff);
                let sum = g.channel_sum(&squared, c);
                let half = g.scalar("half", 0.5);
                g.binary("Mul", &sum, &half)
            }
        };
        terms.push((term, STANDARDISED_STRIDES[scale]));
    }
    if fusion.standardises() {
        let mut log_energy = |x: &str| {
            let squared = g.binary("Mul", x, x);
            let sum = g.channel_sum(&squared, channels[0]);
            let eps = g.scalar("eps", MAGNITUDE_EPS as f32);
            let clamped = g.binary("Max", &sum, &eps);
            g.node("Log", &[&clamped], vec![], "log")
        };
        let t_log = log_energy(&teacher_taps[0]);
        let s_log = log_energy(&student_taps[0]);
        let diff = g.binary("Sub", &s_log, &t_log);
        let squared = g.binary("Mul", &diff, &diff);
        let quarter = g.scalar("quarter", 0.25);
        terms.push((g.binary("Mul", &squared, &quarter), STANDARDISED_STRIDES[3]));
    }
    terms
}

/// W(r − μ) as a 1×1 Conv with weight W and bias −Wμ.
fn whiten(g: &mut GraphBuilder, residual: &str, whitening: &ScaleWhitening) -> String {
    let c = whitening.channels();
    let weight = g.float_initializer(WHITEN_WEIGHT, &[c, c, 1, 1], &whitening.matrix);
    let bias = g.float_initializer("whiten_b", &[c], &whitening.bias());
    let attributes = vec![graph::attr_ints("kernel_shape", &[1, 1])];
    g.node("Conv", &[residual, &weight, &bias], attributes, "whiten")
}

/// Upsamples the terms to 1/`fusion_stride` of the input size and combines them as
/// `options.fusion` says.
fn fuse_terms(g: &mut GraphBuilder, terms: Vec<(String, usize)>, options: &MapOptions) -> String {
    let mut fused: Option<String> = None;
    for (index, (term, stride)) in terms.into_iter().enumerate() {
        let mut map = g.upsample(&term, stride / options.fusion_stride.max(1));
        if options.fusion.standardises() {
            let scale = g.scalar("inv_std", 1.0 / options.stats.divisor(index));
            let shift = g.scalar(
                "shift",
                -options.stats.mean[index] / options.stats.divisor(index),
            );
            let scaled = g.binary("Mul", &map, &scale);
            map = g.binary("Add", &scaled, &shift);
        }
        fused = Some(match fused {
            None => map,
            Some(acc) => g.binary(
                if options.fusion == Fusion::Product {
                    "Mul"
                } else {
                    "Add"
                },
                &acc,
                &map,
            ),
        });
    }
    fused.unwrap_or_default()
}

/// Builds the whole STPM graph for `[N, 3, size[0], size[1]]` inputs.
pub fn stpm_model(
    teacher: &Backbone,
    student: &Backbone,
    size: [usize; 2],
    options: &MapOptions,
    metadata: &[(&str, String)],
) -> Result<ModelProto, OnnxError> {
    if teacher.kind() != student.kind() {
        return Err(OnnxError::ArchitectureMismatch {
            teacher: teacher.kind().to_string(),
            student: student.kind().to_string(),
        });
    }
    let mut g = GraphBuilder::default();
    let teacher_taps = pyramid(&mut g, teacher, INPUT_NAME, "t");
    let student_taps = pyramid(&mut g, student, INPUT_NAME, "s");
    let channels = student.kind().tap_channels();
    let whitening = options.term_whitening(channels);
    let teacher_hat: [String; 3] = std::array::from_fn(|scale| {
        g.l2_normalize(&teacher_taps[scale], channels[scale], NORM_EPS as f32)
    });
    let terms = distance_terms(
        &mut g,
        &teacher_taps,
        &teacher_hat,
        &student_taps,
        channels,
        options.fusion,
        whitening.as_ref(),
    );
    let mut fused = fuse_terms(&mut g, terms, options);
    let fusion_stride = options.fusion_stride.max(1);
    if let Some(defect_head) = &options.head {
        let term = head::head_term(
            &mut g,
            &teacher_hat,
            defect_head,
            HEAD_STRIDE / fusion_stride,
        );
        fused = g.binary("Add", &fused, &term);
    }
    let blurred = g.gaussian_blur(
        &fused,
        &gaussian_kernel(options.blur_sigma / fusion_stride as f32),
    );
    let fused = g.upsample(&blurred, fusion_stride);
    g.node_named("Identity", &[&fused], vec![], MAP_OUTPUT);
    let max_attrs = vec![
        graph::attr_ints("axes", &[1, 2, 3]),
        graph::attr_int("keepdims", 0),
    ];
    g.node_named("ReduceMax", &[MAP_OUTPUT], max_attrs, SCORE_OUTPUT);

    let [h, w] = size;
    let graph = g.finish(
        "stpm",
        vec![float_value_info(
            INPUT_NAME,
            &[None, Some(3), Some(h), Some(w)],
        )],
        vec![
            float_value_info(MAP_OUTPUT, &[None, Some(1), Some(h), Some(w)]),
            float_value_info(SCORE_OUTPUT, &[None]),
        ],
    );
    Ok(model_proto(
        graph,
        "STPM teacher + student with anomaly-map scoring",
        metadata,
    ))
}

/// A model of ours around `graph`: our IR and opset versions, producer and `metadata`.
fn model_proto(graph: GraphProto, doc: &str, metadata: &[(&str, String)]) -> ModelProto {
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "stpm-stream".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc.into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: metadata
            .iter()
            .map(|(key, value)| StringStringEntryProto {
                key: key.to_string(),
                value: value.clone(),
            })
            .collect(),
    }
}

/// The teacher alone: input `image` [N,3,H,W], outputs its raw (not normalised) stride-4, 8 and 16
/// features under the returned names. Training computes its cached teacher features with it, in
/// ONNX Runtime (several times faster than the training framework's forward on the CPU).
pub fn teacher_model(teacher: &Backbone, size: [usize; 2]) -> (ModelProto, [String; 3]) {
    let mut g = GraphBuilder::default();
    let taps = pyramid(&mut g, teacher, INPUT_NAME, "t");
    let [h, w] = size;
    let outputs = taps
        .iter()
        .map(|name| float_value_info(name, &[None, None, None, None]))
        .collect();
    let graph = g.finish(
        "stpm_teacher",
        vec![float_value_info(
            INPUT_NAME,
            &[None, Some(3), Some(h), Some(w)],
        )],
        outputs,
    );
    (
        model_proto(graph, "STPM teacher pyramid (training cache)", &[]),
        taps,
    )
}

/// Serialises `model` to `path`; returns the bytes written (for hashing).
pub fn write_model(model: &ModelProto, path: &Path) -> Result<Vec<u8>, OnnxError> {
    let bytes = model.encode_to_vec();
    std::fs::write(path, &bytes).map_err(|source| OnnxError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}
