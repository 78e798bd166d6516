//! A minimal writer of PyTorch (1.6+ zip) state dicts of float32 tensors, so tests can feed the
//! `.pth` reader torchvision-layout files without PyTorch: `data.pkl` (pickle protocol 2, tensors
//! as `torch._utils._rebuild_tensor_v2` over persistent storages) and one `data/<i>` per tensor.

use std::io::Write;
use std::path::Path;

fn global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(b'c');
    out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
}

fn string(out: &mut Vec<u8>, text: &str) {
    out.push(b'X');
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn int(out: &mut Vec<u8>, value: usize) {
    out.push(b'J');
    out.extend_from_slice(&(value as i32).to_le_bytes());
}

fn int_tuple(out: &mut Vec<u8>, values: &[usize]) {
    out.push(b'(');
    for &v in values {
        int(out, v);
    }
    out.push(b't');
}

fn empty_ordered_dict(out: &mut Vec<u8>) {
    global(out, "collections", "OrderedDict");
    out.push(b')');
    out.push(b'R');
}

/// Writes `tensors` (name, shape, row-major values) as a state dict at `path`.
pub fn write_state_dict(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut pickle = vec![0x80, 2];
    empty_ordered_dict(&mut pickle);
    pickle.push(b'(');
    for (index, (name, shape, values)) in tensors.iter().enumerate() {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        string(&mut pickle, name);
        global(&mut pickle, "torch._utils", "_rebuild_tensor_v2");
        pickle.push(b'(');
        // Persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel)
        pickle.push(b'(');
        string(&mut pickle, "storage");
        global(&mut pickle, "torch", "FloatStorage");
        string(&mut pickle, &index.to_string());
        string(&mut pickle, "cpu");
        int(&mut pickle, values.len());
        pickle.push(b't');
        pickle.push(b'Q');
        int(&mut pickle, 0);
        int_tuple(&mut pickle, shape);
        let mut strides = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        int_tuple(&mut pickle, &strides);
        pickle.push(0x89); // False: requires_grad
        empty_ordered_dict(&mut pickle);
        pickle.push(b't');
        pickle.push(b'R');
    }
    pickle.push(b'u');
    pickle.push(b'.');

    let file = std::fs::File::create(path).expect("create pth");
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options)
        .expect("zip entry");
    zip.write_all(&pickle).expect("write pickle");
    for (index, (_, _, values)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{index}"), options)
            .expect("zip entry");
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.write_all(&bytes).expect("write storage");
    }
    zip.start_file("archive/version", options)
        .expect("zip entry");
    zip.write_all(b"3\n").expect("version");
    zip.finish().expect("finish zip");
}

/// torchvision ResNet-18 parameter names and shapes (all of them, layer4 and fc included).
pub fn resnet18_layout() -> Vec<(String, Vec<usize>)> {
    let mut layout = Vec::new();
    let bn = |layout: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize| {
        for field in ["weight", "bias", "running_mean", "running_var"] {
            layout.push((format!("{prefix}.{field}"), vec![c]));
        }
    };
    layout.push(("conv1.weight".into(), vec![64, 3, 7, 7]));
    bn(&mut layout, "bn1", 64);
    let mut input = 64;
    for (layer, channels) in [(1, 64), (2, 128), (3, 256), (4, 512)] {
        for block in 0..2 {
            let p = format!("layer{layer}.{block}");
            let block_in = if block == 0 { input } else { channels };
            layout.push((format!("{p}.conv1.weight"), vec![channels, block_in, 3, 3]));
            bn(&mut layout, &format!("{p}.bn1"), channels);
            layout.push((format!("{p}.conv2.weight"), vec![channels, channels, 3, 3]));
            bn(&mut layout, &format!("{p}.bn2"), channels);
            if block == 0 && layer > 1 {
                layout.push((
                    format!("{p}.downsample.0.weight"),
                    vec![channels, block_in, 1, 1],
                ));
                bn(&mut layout, &format!("{p}.downsample.1"), channels);
            }
        }
        input = channels;
    }
    layout.push(("fc.weight".into(), vec![1000, 512]));
    layout.push(("fc.bias".into(), vec![1000]));
    layout
}
