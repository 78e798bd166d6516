//! A small ONNX graph builder: named values, initializers and the few operators an STPM graph
//! needs (convolutions with folded BatchNorm, activations, normalisation, resize, reductions).

use crate::model::to_vec;
use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;

use super::proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, NodeProto, TensorProto,
    TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto, attribute_type, data_type,
};

/// Builds one ONNX graph; value names are generated unique from a prefix.
#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
}

pub(crate) fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: value,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

pub(crate) fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        s: value.as_bytes().to_vec(),
        r#type: attribute_type::STRING,
        ..Default::default()
    }
}

/// A float tensor value description with `dims` (None = symbolic batch dimension "N").
pub fn float_value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(size) => DimensionValue::DimValue(*size as i64),
                None => DimensionValue::DimParam("N".into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

impl GraphBuilder {
    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    /// Adds a node and returns the name of its (single) output.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        prefix: &str,
    ) -> String {
        let output = self.fresh(prefix);
        self.node_named(op, inputs, attributes, &output);
        output
    }

    /// Adds a node whose output has a fixed name (graph outputs).
    pub fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: &str,
    ) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.into(),
            attribute: attributes,
        });
    }

    pub fn float_initializer(&mut self, prefix: &str, dims: &[usize], values: &[f32]) -> String {
        let name = self.fresh(prefix);
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    pub fn int64_initializer(&mut self, prefix: &str, values: &[i64]) -> String {
        let name = self.fresh(prefix);
        self.initializers.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: data_type::INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    pub fn scalar(&mut self, prefix: &str, value: f32) -> String {
        self.float_initializer(prefix, &[], &[value])
    }

    /// A convolution with the following BatchNorm folded into its weights and bias.
    pub fn conv_bn(
        &mut self,
        input: &str,
        conv: &Conv2d,
        bn: Option<&BatchNorm>,
        prefix: &str,
    ) -> String {
        let dims = conv.weight.val().dims();
        let mut weight = to_vec(conv.weight.val());
        let mut bias = match &conv.bias {
            Some(bias) => to_vec(bias.val()),
            None => vec![0.0; dims[0]],
        };
        if let Some(bn) = bn {
            let gamma = to_vec(bn.gamma.val());
            let beta = to_vec(bn.beta.val());
            let mean = to_vec(bn.running_mean.value());
            let var = to_vec(bn.running_var.value());
            let per_out = weight.len() / dims[0];
            for o in 0..dims[0] {
                let scale = gamma[o] / (var[o] + bn.epsilon as f32).sqrt();
                for w in &mut weight[o * per_out..(o + 1) * per_out] {
                    *w *= scale;
                }
                bias[o] = (bias[o] - mean[o]) * scale + beta[o];
            }
        }
        let w = self.float_initializer(&format!("{prefix}_w"), &dims, &weight);
        let b = self.float_initializer(&format!("{prefix}_b"), &[dims[0]], &bias);
        let (top, left, bottom, right) = match conv.padding {
            PaddingConfig2d::Explicit(top, left, bottom, right) => (top, left, bottom, right),
            _ => (0, 0, 0, 0),
        };
        let attributes = vec![
            attr_ints(
                "kernel_shape",
                &[conv.kernel_size[0] as i64, conv.kernel_size[1] as i64],
            ),
            attr_ints("strides", &[conv.stride[0] as i64, conv.stride[1] as i64]),
            attr_ints(
                "dilations",
                &[conv.dilation[0] as i64, conv.dilation[1] as i64],
            ),
            attr_ints(
                "pads",
                &[top as i64, left as i64, bottom as i64, right as i64],
            ),
            attr_int("group", conv.groups as i64),
        ];
        self.node("Conv", &[input, &w, &b], attributes, prefix)
    }

    pub fn max_pool(
        &mut self,
        input: &str,
        kernel: usize,
        stride: usize,
        pad: usize,
        prefix: &str,
    ) -> String {
        let attributes = vec![
            attr_ints("kernel_shape", &[kernel as i64, kernel as i64]),
            attr_ints("strides", &[stride as i64, stride as i64]),
            attr_ints("pads", &[pad as i64; 4]),
        ];
        self.node("MaxPool", &[input], attributes, prefix)
    }

    pub fn relu(&mut self, input: &str) -> String {
        self.node("Relu", &[input], vec![], "relu")
    }

    pub fn relu6(&mut self, input: &str) -> String {
        let low = self.scalar("zero", 0.0);
        let high = self.scalar("six", 6.0);
        self.node("Clip", &[input, &low, &high], vec![], "relu6")
    }

    pub fn binary(&mut self, op: &str, a: &str, b: &str) -> String {
        self.node(op, &[a, b], vec![], &op.to_lowercase())
    }

    /// The sum over the `channels` channels of an NCHW tensor, keeping the axis: [N, 1, H, W], as a
    /// 1×1 Conv with all-one weights. ONNX Runtime's ReduceSum over axis 1 is a strided reduction;
    /// the Conv is a GEMV (INT8 graph, 1 thread: 10.3 against 10.9 ms per image, same map within
    /// 3e-5 of a maximum of 126).
    pub fn channel_sum(&mut self, input: &str, channels: usize) -> String {
        let ones = self.float_initializer("ones", &[1, channels, 1, 1], &vec![1.0; channels]);
        self.node("Conv", &[input, &ones], vec![], "sum")
    }

    /// Channel-wise L2 normalisation of `channels` channels: x / max(‖x‖₂, eps).
    pub fn l2_normalize(&mut self, input: &str, channels: usize, eps: f32) -> String {
        let squared = self.binary("Mul", input, input);
        let sum = self.channel_sum(&squared, channels);
        let norm = self.node("Sqrt", &[&sum], vec![], "norm");
        let eps = self.scalar("eps", eps);
        let clamped = self.binary("Max", &norm, &eps);
        self.binary("Div", input, &clamped)
    }

    /// Bilinear, half-pixel (PyTorch align_corners=False) up-sampling by an integer factor (no
    /// node for a factor of 1).
    pub fn upsample(&mut self, input: &str, factor: usize) -> String {
        if factor <= 1 {
            return input.to_string();
        }
        let roi = self.float_initializer("roi", &[0], &[]);
        let scales =
            self.float_initializer("scales", &[4], &[1.0, 1.0, factor as f32, factor as f32]);
        let attributes = vec![
            attr_string("mode", "linear"),
            attr_string("coordinate_transformation_mode", "half_pixel"),
        ];
        self.node("Resize", &[input, &roi, &scales], attributes, "upsample")
    }

    /// Separable Gaussian blur of a [N, 1, H, W] map with zero padding (two single-channel Convs).
    pub fn gaussian_blur(&mut self, input: &str, taps: &[f32]) -> String {
        if taps.is_empty() {
            return input.to_string();
        }
        let (k, r) = (taps.len(), (taps.len() / 2) as i64);
        let zero = self.float_initializer("blur_b", &[1], &[0.0]);
        let mut x = input.to_string();
        for (dims, pads) in [([1, 1, k, 1], [r, 0, r, 0]), ([1, 1, 1, k], [0, r, 0, r])] {
            let weight = self.float_initializer("blur_w", &dims, taps);
            let attributes = vec![
                attr_ints("kernel_shape", &[dims[2] as i64, dims[3] as i64]),
                attr_ints("pads", &pads),
            ];
            x = self.node("Conv", &[&x, &weight, &zero], attributes, "blur");
        }
        x
    }

    pub fn finish(
        self,
        name: &str,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
    ) -> GraphProto {
        GraphProto {
            node: self.nodes,
            name: name.into(),
            initializer: self.initializers,
            input: inputs,
            output: outputs,
        }
    }
}
