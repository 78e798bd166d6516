//! The INT8 rewrite of an exported STPM graph: QuantizeLinear/DequantizeLinear pairs around the
//! convolution backbones (weights int8 per output channel, activations per tensor from calibrated
//! ranges), the QDQ form ONNX Runtime fuses into QLinearConv/QLinearAdd. Pure graph surgery: the
//! scoring after the feature taps stays fp32, and nothing here runs a model.

use std::collections::{HashMap, HashSet};

use crate::onnx::graph::attr_int;
use crate::onnx::proto::{
    GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, data_type,
};
use crate::onnx::proto::{TensorTypeProto, data_type::FLOAT};

/// Operators of the convolution backbones: everything between the image and the feature taps.
const BACKBONE_OPS: [&str; 5] = ["Conv", "Clip", "Relu", "Add", "MaxPool"];
/// Activations a following QuantizeLinear absorbs (ONNX Runtime drops them when the quantised
/// range starts at 0 and ends inside the clip), so the tensor before them needs no range.
const ACTIVATION_OPS: [&str; 2] = ["Clip", "Relu"];

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("the graph has no input")]
    NoInput,
    #[error("no convolution backbone starts at input `{0}` (not an STPM graph?)")]
    NoBackbone(String),
    #[error("initializer `{name}` of a backbone Conv is missing or not raw float data")]
    BadInitializer { name: String },
    #[error("no calibrated range for tensor `{0}` (calibration did not observe it)")]
    MissingRange(String),
    #[error("calibrated range of `{name}` is not finite: [{min}, {max}]")]
    BadRange { name: String, min: f32, max: f32 },
}

/// Integer type of the quantised activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ActivationType {
    /// uint8 (ONNX Runtime's U8S8 kernels; VNNI on x86).
    #[default]
    Uint8,
    /// int8 (S8S8; ONNX Runtime converts it to U8S8 on x86).
    Int8,
    /// int8 with zero point 0, scale = max |x| / 127: TensorRT's scheme (its explicit quantisation
    /// takes only symmetric int8 Q/DQ pairs), made by `stpm export --format tensorrt --precision int8`.
    #[value(name = "int8-symmetric")]
    Int8Symmetric,
}

impl ActivationType {
    pub fn name(self) -> &'static str {
        match self {
            ActivationType::Uint8 => "uint8",
            ActivationType::Int8 => "int8",
            ActivationType::Int8Symmetric => crate::bundle::TENSORRT_INT8_ACTIVATIONS,
        }
    }

    /// Whether TensorRT can build an engine from Q/DQ pairs of this type.
    pub fn tensorrt_compatible(self) -> bool {
        self == ActivationType::Int8Symmetric
    }

    fn bounds(self) -> (i32, i32) {
        match self {
            ActivationType::Uint8 => (0, 255),
            ActivationType::Int8 | ActivationType::Int8Symmetric => (-128, 127),
        }
    }

    fn data_type(self) -> i32 {
        match self {
            ActivationType::Uint8 => data_type::UINT8,
            ActivationType::Int8 | ActivationType::Int8Symmetric => data_type::INT8,
        }
    }
}

/// Values observed in one tensor over the calibration images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Default for Range {
    fn default() -> Self {
        Self {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl Range {
    pub fn observe(&mut self, values: &[f32]) {
        for &v in values {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }
}

/// Affine quantisation of one tensor: real = scale · (q − zero_point).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub scale: f32,
    pub zero_point: i32,
}

/// Per-tensor parameters covering `range` (widened to include 0, so zero padding stays exact).
pub fn activation_params(range: Range, activations: ActivationType) -> Affine {
    if activations == ActivationType::Int8Symmetric {
        let largest = range.min.abs().max(range.max.abs());
        let scale = if largest > 0.0 { largest / 127.0 } else { 1.0 };
        return Affine {
            scale,
            zero_point: 0,
        };
    }
    let (qmin, qmax) = activations.bounds();
    let low = range.min.min(0.0);
    let high = range.max.max(0.0);
    let scale = if high > low {
        (high - low) / (qmax - qmin) as f32
    } else {
        1.0
    };
    let zero_point = (qmin as f32 - low / scale)
        .round()
        .clamp(qmin as f32, qmax as f32) as i32;
    Affine { scale, zero_point }
}

/// Largest weight magnitude of the int8 weights (7 bits and a half, not 8): x86 CPUs without
/// VNNI (AVX2 only) multiply uint8 activations by int8 weights with `vpmaddubsw`, which adds two
/// products in 16 bits and saturates above 32767; 2 × 255 × 64 = 32640 never does, 2 × 255 × 127
/// does. Full-range weights gave maps that correlate at 0.77 with fp32 on such a CPU (AMD EPYC,
/// AVX2 only) against 0.9994 on one with VNNI. ONNX Runtime's own quantiser calls this
/// `reduce_range`.
pub const WEIGHT_QMAX: f32 = 64.0;

/// Symmetric int8 per output channel (the first dimension): scale = max|w| / [`WEIGHT_QMAX`],
/// zero point 0.
pub fn weight_params(weights: &[f32], out_channels: usize) -> (Vec<i8>, Vec<f32>) {
    let per_channel = weights.len() / out_channels.max(1);
    let mut quantised = Vec::with_capacity(weights.len());
    let mut scales = Vec::with_capacity(out_channels);
    for channel in weights.chunks(per_channel.max(1)) {
        let largest = channel.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let scale = if largest > 0.0 {
            largest / WEIGHT_QMAX
        } else {
            1.0
        };
        scales.push(scale);
        quantised.extend(
            channel
                .iter()
                .map(|w| (w / scale).round().clamp(-WEIGHT_QMAX, WEIGHT_QMAX) as i8),
        );
    }
    (quantised, scales)
}

/// Which tensors of a graph are quantised.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Tensors that need a calibrated range, in graph order: every backbone tensor not consumed
    /// only by a Clip/Relu (that activation's output carries the range instead), and the input
    /// when a node other than a stem Conv reads it.
    pub tensors: Vec<String>,
    /// Indices of the backbone nodes (Conv, Clip, Relu, Add, MaxPool reached from the input).
    backbone: HashSet<usize>,
    /// Backbone Convs that stay fp32: those reading the image.
    stems: HashSet<usize>,
    /// The graph input.
    input: String,
}

impl Plan {
    /// Number of backbone Conv nodes whose weights become int8.
    pub fn conv_count(&self, graph: &GraphProto) -> usize {
        self.backbone
            .iter()
            .filter(|&&i| graph.node[i].op_type == "Conv" && !self.stems.contains(&i))
            .count()
    }
}

/// Finds the backbones: nodes of `BACKBONE_OPS` whose inputs are all the image, backbone outputs
/// or initializers. The scoring is not: its Convs (channel sums, whitening, blur) read what its
/// Mul/Sub/Div nodes made.
pub fn plan(graph: &GraphProto) -> Result<Plan, QuantizeError> {
    let input = graph
        .input
        .first()
        .ok_or(QuantizeError::NoInput)?
        .name
        .clone();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut backbone_tensors: HashSet<&str> = HashSet::from([input.as_str()]);
    let mut backbone = HashSet::new();
    for (index, node) in graph.node.iter().enumerate() {
        let inside = BACKBONE_OPS.contains(&node.op_type.as_str())
            && node
                .input
                .iter()
                .any(|i| backbone_tensors.contains(i.as_str()))
            && node.input.iter().all(|i| {
                backbone_tensors.contains(i.as_str()) || initializers.contains(i.as_str())
            });
        if inside {
            backbone.insert(index);
            backbone_tensors.extend(node.output.iter().map(String::as_str));
        }
    }
    if backbone.is_empty() {
        return Err(QuantizeError::NoBackbone(input));
    }
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for node in &graph.node {
        for name in &node.input {
            consumers.entry(name.as_str()).or_default().push(node);
        }
    }
    let absorbed = |tensor: &str| match consumers.get(tensor).map(Vec::as_slice) {
        Some([only]) => ACTIVATION_OPS.contains(&only.op_type.as_str()),
        _ => false,
    };
    // Stems (Convs on the image itself) stay fp32: with 3 input channels an int8 GEMM has too
    // little depth to pay off (about 6 ms each against 1-2 ms in fp32 here), and the image is the
    // most range-sensitive tensor.
    let stems: HashSet<usize> = backbone
        .iter()
        .copied()
        .filter(|&i| graph.node[i].op_type == "Conv" && graph.node[i].input[0] == input)
        .collect();
    let input_quantised = backbone
        .iter()
        .any(|i| !stems.contains(i) && graph.node[*i].input.contains(&input));
    let mut tensors = Vec::new();
    if input_quantised {
        tensors.push(input.clone());
    }
    for (index, node) in graph.node.iter().enumerate() {
        if backbone.contains(&index) {
            tensors.extend(node.output.iter().filter(|t| !absorbed(t)).cloned());
        }
    }
    Ok(Plan {
        tensors,
        backbone,
        stems,
        input,
    })
}

/// `model` with the float tensors `names` added as graph outputs, so a session returns them.
pub fn with_outputs(model: &ModelProto, names: &[String]) -> ModelProto {
    let mut probed = model.clone();
    if let Some(graph) = probed.graph.as_mut() {
        let existing: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        for name in names.iter().filter(|t| !existing.contains(*t)) {
            graph.output.push(ValueInfoProto {
                name: name.clone(),
                r#type: Some(TypeProto {
                    tensor_type: Some(TensorTypeProto {
                        elem_type: FLOAT,
                        shape: None,
                    }),
                }),
            });
        }
    }
    probed
}

fn tensor(name: String, data_type: i32, dims: Vec<i64>, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        dims,
        data_type,
        name,
        raw_data,
    }
}

fn float_values(tensor: &TensorProto) -> Option<Vec<f32>> {
    let count: i64 = tensor.dims.iter().product();
    (tensor.data_type == FLOAT && tensor.raw_data.len() == count.max(0) as usize * 4).then(|| {
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

fn node(op: &str, inputs: Vec<String>, output: String, axis: Option<i64>) -> NodeProto {
    NodeProto {
        name: format!("{output}_{op}"),
        input: inputs,
        output: vec![output],
        op_type: op.into(),
        attribute: axis.map(|a| vec![attr_int("axis", a)]).unwrap_or_default(),
    }
}

/// The rewrite's output, built node by node.
struct Rewrite {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Quantised activation → the name of its dequantised copy, which consumers read.
    renamed: HashMap<String, String>,
    params: HashMap<String, Affine>,
    activations: ActivationType,
}

impl Rewrite {
    /// `name` → QuantizeLinear → DequantizeLinear → `name_dq`.
    fn quantise_activation(&mut self, name: &str, affine: Affine) {
        let scale = format!("{name}_scale");
        let zero_point = format!("{name}_zero_point");
        let quantised = format!("{name}_quantized");
        let dequantised = format!("{name}_dq");
        self.initializers.push(tensor(
            scale.clone(),
            FLOAT,
            vec![],
            affine.scale.to_le_bytes().to_vec(),
        ));
        let zp_bytes = match self.activations {
            ActivationType::Uint8 => vec![affine.zero_point as u8],
            ActivationType::Int8 | ActivationType::Int8Symmetric => {
                vec![affine.zero_point as i8 as u8]
            }
        };
        self.initializers.push(tensor(
            zero_point.clone(),
            self.activations.data_type(),
            vec![],
            zp_bytes,
        ));
        let qdq = [scale, zero_point];
        self.nodes.push(node(
            "QuantizeLinear",
            [vec![name.to_string()], qdq.to_vec()].concat(),
            quantised.clone(),
            None,
        ));
        self.nodes.push(node(
            "DequantizeLinear",
            [vec![quantised], qdq.to_vec()].concat(),
            dequantised.clone(),
            None,
        ));
        self.params.insert(name.to_string(), affine);
        self.renamed.insert(name.to_string(), dequantised);
    }

    /// The integer initializer `quantised` (name, then data type, dims, little-endian bytes) behind
    /// a DequantizeLinear with `scales` per output channel (axis 0) and zero points 0; returns the
    /// dequantised name (`<base>_dq`, where `quantised` is `<base>_<type>`).
    fn dequantised_per_channel(
        &mut self,
        name: &str,
        quantised: (i32, Vec<i64>, Vec<u8>),
        scales: &[f32],
    ) -> String {
        let (elem_type, dims, bytes) = quantised;
        let base = name.rsplit_once('_').map_or(name, |(base, _)| base);
        let scale = format!("{base}_scale");
        let zero_point = format!("{base}_zero_point");
        let dequantised = format!("{base}_dq");
        let channels = vec![scales.len() as i64];
        let zero_bytes = if elem_type == data_type::INT32 { 4 } else { 1 };
        self.initializers.extend([
            tensor(name.to_string(), elem_type, dims, bytes),
            tensor(
                scale.clone(),
                FLOAT,
                channels.clone(),
                scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ),
            tensor(
                zero_point.clone(),
                elem_type,
                channels,
                vec![0; scales.len() * zero_bytes],
            ),
        ]);
        self.nodes.push(node(
            "DequantizeLinear",
            vec![name.to_string(), scale, zero_point],
            dequantised.clone(),
            Some(0),
        ));
        dequantised
    }

    /// Weights → int8 per output channel and bias → int32 at scale x_scale·w_scale, each behind a
    /// DequantizeLinear (axis 0); returns the names the Conv reads instead. For TensorRT the bias
    /// stays float.
    fn quantise_conv(
        &mut self,
        conv: &NodeProto,
        float_inits: &HashMap<&str, &TensorProto>,
        x_scale: f32,
    ) -> Result<Vec<String>, QuantizeError> {
        let bad = |name: &str| QuantizeError::BadInitializer {
            name: name.to_string(),
        };
        let weight_name = conv.input.get(1).ok_or_else(|| bad(&conv.name))?;
        let weight = float_inits
            .get(weight_name.as_str())
            .ok_or_else(|| bad(weight_name))?;
        let values = float_values(weight).ok_or_else(|| bad(weight_name))?;
        let out_channels = weight.dims.first().copied().unwrap_or(1).max(1) as usize;
        let (quantised, scales) = weight_params(&values, out_channels);
        let weight_bytes = quantised.iter().map(|&q| q as u8).collect();
        let mut inputs = vec![self.dequantised_per_channel(
            &format!("{weight_name}_int8"),
            (data_type::INT8, weight.dims.clone(), weight_bytes),
            &scales,
        )];
        if let Some(bias_name) = conv.input.get(2).filter(|b| !b.is_empty()) {
            if self.activations.tensorrt_compatible() {
                // TensorRT takes no int32 DequantizeLinear: it keeps a float bias and fuses it.
                inputs.push(bias_name.clone());
                return Ok(inputs);
            }
            let bias = float_inits
                .get(bias_name.as_str())
                .and_then(|t| float_values(t))
                .filter(|b| b.len() == out_channels)
                .ok_or_else(|| bad(bias_name))?;
            let bias_scales: Vec<f32> = scales.iter().map(|s| s * x_scale).collect();
            let bias_bytes = bias
                .iter()
                .zip(&bias_scales)
                .flat_map(|(b, s)| ((*b as f64 / *s as f64).round() as i32).to_le_bytes())
                .collect();
            inputs.push(self.dequantised_per_channel(
                &format!("{bias_name}_int32"),
                (data_type::INT32, vec![out_channels as i64], bias_bytes),
                &bias_scales,
            ));
        }
        Ok(inputs)
    }
}

/// One scale's whitening Conv in a graph's scoring: W(r − μ) as a 1×1 Conv.
#[derive(Debug, Clone, PartialEq)]
pub struct WhiteningConv {
    /// The residual t̂ − ŝ it reads.
    pub residual: String,
    pub weight: String,
    pub bias: String,
    pub channels: usize,
}

/// The whitening Convs of a `whitened` graph in scale order (graph order), or none.
pub fn whitening_convs(graph: &GraphProto) -> Vec<WhiteningConv> {
    let dims: HashMap<&str, &[i64]> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "Conv" && n.input.len() == 3)
        .filter(|n| n.input[1].starts_with(crate::onnx::WHITEN_WEIGHT))
        .filter_map(|n| {
            let channels = *dims.get(n.input[1].as_str())?.first()? as usize;
            Some(WhiteningConv {
                residual: n.input[0].clone(),
                weight: n.input[1].clone(),
                bias: n.input[2].clone(),
                channels,
            })
        })
        .collect()
}

/// Writes `whitening` into the Convs `convs` of `model` (matrix as the weight, −Wμ as the bias).
pub fn set_whitening(
    model: &mut ModelProto,
    convs: &[WhiteningConv],
    whitening: &crate::model::features::Whitening,
) -> Result<(), QuantizeError> {
    let graph = model.graph.as_mut().ok_or(QuantizeError::NoInput)?;
    for (conv, scale) in convs.iter().zip(&whitening.0) {
        for (name, values) in [(&conv.weight, &scale.matrix), (&conv.bias, &scale.bias())] {
            let init = graph
                .initializer
                .iter_mut()
                .find(|t| &t.name == name)
                .filter(|t| t.data_type == FLOAT)
                .filter(|t| t.dims.iter().product::<i64>() == values.len() as i64)
                .ok_or_else(|| QuantizeError::BadInitializer { name: name.clone() })?;
            init.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
    }
    Ok(())
}

fn checked(name: &str, ranges: &HashMap<String, Range>) -> Result<Range, QuantizeError> {
    let range = *ranges
        .get(name)
        .ok_or_else(|| QuantizeError::MissingRange(name.to_string()))?;
    if range.min.is_finite() && range.max.is_finite() && range.min <= range.max {
        Ok(range)
    } else {
        Err(QuantizeError::BadRange {
            name: name.to_string(),
            min: range.min,
            max: range.max,
        })
    }
}

/// The QDQ model: every planned tensor quantised with its range from `ranges`, backbone Conv
/// weights int8 per output channel, biases int32; everything else untouched.
pub fn quantise(
    model: &ModelProto,
    plan: &Plan,
    ranges: &HashMap<String, Range>,
    activations: ActivationType,
) -> Result<ModelProto, QuantizeError> {
    let mut model = model.clone();
    let Some(graph) = model.graph.as_mut() else {
        return Err(QuantizeError::NoInput);
    };
    let float_inits: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let planned: HashSet<&str> = plan.tensors.iter().map(String::as_str).collect();
    let mut rewrite = Rewrite {
        nodes: Vec::with_capacity(graph.node.len() * 3),
        initializers: Vec::new(),
        renamed: HashMap::new(),
        params: HashMap::new(),
        activations,
    };
    if planned.contains(plan.input.as_str()) {
        let range = checked(&plan.input, ranges)?;
        rewrite.quantise_activation(&plan.input, activation_params(range, activations));
    }
    for (index, original) in graph.node.iter().enumerate() {
        let mut node = original.clone();
        for name in &mut node.input {
            if let Some(dq) = rewrite.renamed.get(name.as_str()) {
                name.clone_from(dq);
            }
        }
        let inside = plan.backbone.contains(&index);
        if inside && node.op_type == "Conv" && !plan.stems.contains(&index) {
            let x = &original.input[0];
            let x_scale = rewrite
                .params
                .get(x.as_str())
                .ok_or_else(|| QuantizeError::MissingRange(x.clone()))?
                .scale;
            let replaced = rewrite.quantise_conv(original, &float_inits, x_scale)?;
            node.input.truncate(1);
            node.input.extend(replaced);
        }
        rewrite.nodes.push(node);
        if !inside {
            continue;
        }
        for output in original
            .output
            .iter()
            .filter(|o| planned.contains(o.as_str()))
        {
            // MaxPool moves quantised values unchanged when its output keeps the input's scale.
            let affine = match (original.op_type.as_str(), original.input.first()) {
                ("MaxPool", Some(x)) => rewrite.params.get(x.as_str()).copied(),
                _ => None,
            };
            let affine = match affine {
                Some(affine) => affine,
                None => activation_params(checked(output, ranges)?, activations),
            };
            rewrite.quantise_activation(output, affine);
        }
    }
    let Rewrite {
        nodes,
        initializers,
        ..
    } = rewrite;
    let used: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let mut kept: Vec<TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| used.contains(t.name.as_str()))
        .cloned()
        .collect();
    kept.extend(initializers);
    graph.node = nodes;
    graph.initializer = kept;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::{GraphBuilder, float_value_info};

    fn ints(tensor: &TensorProto) -> Vec<i32> {
        match tensor.data_type {
            data_type::INT8 => tensor.raw_data.iter().map(|&b| b as i8 as i32).collect(),
            data_type::UINT8 => tensor.raw_data.iter().map(|&b| b as i32).collect(),
            _ => tensor
                .raw_data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }

    #[test]
    fn weights_are_symmetric_per_output_channel() {
        let (q, scales) = weight_params(&[0.5, -0.25, 1.0, 2.0, 0.0, 0.0], 3);
        assert_eq!(scales, vec![0.5 / 64.0, 2.0 / 64.0, 1.0]);
        assert_eq!(q, vec![64, -32, 32, 64, 0, 0]);
        // No weight leaves the range that AVX2's 16-bit pair sums hold with uint8 activations.
        let (q, _) = weight_params(&[-3.0, 1.0, 2.9, -0.1], 1);
        assert_eq!(q, vec![-64, 21, 62, -2]);
        assert!(
            q.iter()
                .all(|&w| 2 * 255 * i32::from(w).abs() <= i32::from(i16::MAX))
        );
    }

    #[test]
    fn activation_ranges_include_zero() {
        let u8_params = activation_params(
            Range {
                min: -1.0,
                max: 3.0,
            },
            ActivationType::Uint8,
        );
        assert!((u8_params.scale - 4.0 / 255.0).abs() < 1e-9);
        assert_eq!(u8_params.zero_point, 64);
        // A ReLU6 output: zero point at the bottom, so ONNX Runtime can drop the Clip.
        let relu6 = activation_params(Range { min: 0.0, max: 6.0 }, ActivationType::Uint8);
        assert_eq!((relu6.scale, relu6.zero_point), (6.0 / 255.0, 0));
        let i8_params = activation_params(Range { min: 0.5, max: 2.0 }, ActivationType::Int8);
        assert_eq!(i8_params.zero_point, -128);
        let flat = activation_params(Range { min: 0.0, max: 0.0 }, ActivationType::Uint8);
        assert_eq!((flat.scale, flat.zero_point), (1.0, 0));
    }

    #[test]
    fn tensorrt_activations_are_symmetric_around_zero() {
        let sym = |min, max| activation_params(Range { min, max }, ActivationType::Int8Symmetric);
        // The larger side sets the scale; zero maps to 0 whatever the range.
        assert_eq!(
            sym(-1.0, 3.0),
            Affine {
                scale: 3.0 / 127.0,
                zero_point: 0
            }
        );
        assert_eq!(
            sym(-4.0, 2.0),
            Affine {
                scale: 4.0 / 127.0,
                zero_point: 0
            }
        );
        assert_eq!(
            sym(0.0, 6.0),
            Affine {
                scale: 6.0 / 127.0,
                zero_point: 0
            }
        );
        assert_eq!(
            sym(0.0, 0.0),
            Affine {
                scale: 1.0,
                zero_point: 0
            }
        );
        assert!(ActivationType::Int8Symmetric.tensorrt_compatible());
        assert!(!ActivationType::Int8.tensorrt_compatible());
        assert!(!ActivationType::Uint8.tensorrt_compatible());
    }

    /// image → stem Conv → Clip → Conv(w2, b2) → Add(Clip) → Mul(x, x) (scoring) → Conv(blur).
    fn small_model() -> (ModelProto, [String; 2]) {
        let mut g = GraphBuilder::default();
        let w1 = g.float_initializer("w1", &[2, 1, 1, 1], &[0.5, -0.25]);
        let b1 = g.float_initializer("b1", &[2], &[0.1, -0.2]);
        let stem = g.node("Conv", &["image", &w1, &b1], vec![], "stem");
        let low = g.scalar("zero", 0.0);
        let high = g.scalar("six", 6.0);
        let clip = g.node("Clip", &[&stem, &low, &high], vec![], "relu6");
        let w2 = g.float_initializer("w2", &[2, 2, 1, 1], &[0.5, -0.25, 1.0, 2.0]);
        let b2 = g.float_initializer("b2", &[2], &[0.1, -0.2]);
        let conv2 = g.node("Conv", &[&clip, &w2, &b2], vec![], "conv2");
        let add = g.binary("Add", &conv2, &clip);
        let squared = g.binary("Mul", &add, &add);
        let w3 = g.float_initializer("blur_w", &[1, 2, 1, 1], &[1.0, 1.0]);
        let b3 = g.float_initializer("blur_b", &[1], &[0.0]);
        g.node_named("Conv", &[&squared, &w3, &b3], vec![], "map");
        let graph = g.finish(
            "small",
            vec![float_value_info(
                "image",
                &[None, Some(1), Some(2), Some(2)],
            )],
            vec![float_value_info("map", &[None, Some(1), Some(2), Some(2)])],
        );
        let model = ModelProto {
            graph: Some(graph),
            ..Default::default()
        };
        (model, [clip, add])
    }

    fn floats(tensor: &TensorProto) -> Vec<f32> {
        float_values(tensor).unwrap_or_default()
    }

    /// `small_model` quantised with every planned tensor in [-1, 3].
    fn quantised_small_model(activations: ActivationType) -> ModelProto {
        let (model, _) = small_model();
        let plan = plan(model.graph.as_ref().expect("graph")).expect("plan");
        let range = Range {
            min: -1.0,
            max: 3.0,
        };
        let ranges: HashMap<String, Range> =
            plan.tensors.iter().map(|t| (t.clone(), range)).collect();
        quantise(&model, &plan, &ranges, activations).expect("quantise")
    }

    fn initializer<'a>(graph: &'a GraphProto, name: &str) -> &'a TensorProto {
        graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no initializer {name}"))
    }

    #[test]
    fn rewrite_quantises_the_backbone_only() {
        let (model, [clip, add]) = small_model();
        let graph = model.graph.as_ref().expect("graph");
        let plan = plan(graph).expect("plan");
        // The stem stays fp32, so the image needs no range; neither does the Conv output the Clip
        // absorbs. The blur Conv is not backbone.
        assert_eq!(plan.tensors.len(), 3, "{:?}", plan.tensors);
        assert!(!plan.tensors.iter().any(|t| t == "image"));
        assert_eq!(plan.conv_count(graph), 1);
        let quantised = quantised_small_model(ActivationType::Uint8);
        let graph = quantised.graph.as_ref().expect("graph");
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("QuantizeLinear"), 3);
        // 3 activations + the weights and bias of the one int8 Conv.
        assert_eq!(count("DequantizeLinear"), 5);
        assert_eq!(count("Conv"), 3);
        let init = |name: &str| initializer(graph, name);
        let convs: Vec<&NodeProto> = graph.node.iter().filter(|n| n.op_type == "Conv").collect();
        // The stem reads the image and its fp32 weights.
        assert_eq!(convs[0].input[0], "image");
        assert_eq!(floats(init(&convs[0].input[1])), vec![0.5, -0.25]);
        // conv2 reads the dequantised Clip output and int8 weights, per output channel.
        assert_eq!(convs[1].input[0], format!("{clip}_dq"));
        let weight = convs[1].input[1].trim_end_matches("_dq");
        assert_eq!(ints(init(&format!("{weight}_int8"))), vec![64, -32, 32, 64]);
        assert_eq!(init(&format!("{weight}_int8")).dims, vec![2, 2, 1, 1]);
        let scales = floats(init(&format!("{weight}_scale")));
        assert_eq!(scales, vec![0.5 / 64.0, 2.0 / 64.0]);
        assert_eq!(ints(init(&format!("{weight}_zero_point"))), vec![0, 0]);
        // The bias is int32 at input scale × weight scale.
        let x_scale = 4.0f32 / 255.0;
        assert_eq!(floats(init(&format!("{clip}_scale"))), vec![x_scale]);
        assert_eq!(ints(init(&format!("{clip}_zero_point"))), vec![64]);
        assert_eq!(
            init(&format!("{clip}_zero_point")).data_type,
            data_type::UINT8
        );
        let bias = convs[1].input[2].trim_end_matches("_dq");
        let bias_scales = [scales[0] * x_scale, scales[1] * x_scale];
        assert_eq!(floats(init(&format!("{bias}_scale"))), bias_scales.to_vec());
        assert_eq!(
            ints(init(&format!("{bias}_int32"))),
            vec![
                (0.1f32 as f64 / bias_scales[0] as f64).round() as i32,
                (-0.2f32 as f64 / bias_scales[1] as f64).round() as i32
            ]
        );
        // conv2's fp32 weights are gone, the stem's and blur's stay; the scoring reads the
        // dequantised Add, the blur its fp32 input.
        assert!(graph.initializer.iter().all(|t| t.name != weight));
        assert!(
            graph
                .initializer
                .iter()
                .any(|t| t.name.starts_with("blur_w"))
        );
        let mul = graph.node.iter().find(|n| n.op_type == "Mul").expect("mul");
        assert_eq!(mul.input, vec![format!("{add}_dq"), format!("{add}_dq")]);
        assert!(convs[2].input[1].starts_with("blur_w"));
    }

    #[test]
    fn tensorrt_graph_has_int8_zero_points_and_a_float_bias() {
        let quantised = quantised_small_model(ActivationType::Int8Symmetric);
        let graph = quantised.graph.as_ref().expect("graph");
        let init = |name: &str| initializer(graph, name);
        // Every Q/DQ pair is int8 with zero point 0; no int32 anywhere.
        for node in graph
            .node
            .iter()
            .filter(|n| n.op_type == "QuantizeLinear" || n.op_type == "DequantizeLinear")
        {
            let zero_point = init(&node.input[2]);
            assert_eq!(zero_point.data_type, data_type::INT8, "{}", node.input[2]);
            assert!(
                ints(zero_point).iter().all(|&z| z == 0),
                "{}",
                node.input[2]
            );
        }
        assert!(
            graph
                .initializer
                .iter()
                .all(|t| t.data_type != data_type::INT32)
        );
        // 3 activations + the weights of the one int8 Conv; its bias is the original float one.
        let count = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
        assert_eq!(count("QuantizeLinear"), 3);
        assert_eq!(count("DequantizeLinear"), 4);
        let convs: Vec<&NodeProto> = graph.node.iter().filter(|n| n.op_type == "Conv").collect();
        let bias = &convs[1].input[2];
        assert_eq!(floats(init(bias)), vec![0.1, -0.2]);
        let clip = convs[1].input[0].trim_end_matches("_dq");
        assert_eq!(floats(init(&format!("{clip}_scale"))), vec![3.0 / 127.0]);
    }

    #[test]
    fn missing_or_broken_ranges_are_errors() {
        let (model, _) = small_model();
        let plan = plan(model.graph.as_ref().expect("graph")).expect("plan");
        let error = quantise(&model, &plan, &HashMap::new(), ActivationType::Uint8);
        assert!(matches!(error, Err(QuantizeError::MissingRange(name)) if name == plan.tensors[0]));
        let ranges = plan
            .tensors
            .iter()
            .map(|t| (t.clone(), Range::default()))
            .collect();
        let error = quantise(&model, &plan, &ranges, ActivationType::Uint8);
        assert!(matches!(error, Err(QuantizeError::BadRange { .. })));
    }
}
