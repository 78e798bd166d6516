//! ResNet-18 teachers come from user-supplied torchvision state dicts: the `.pth` reader must map
//! every torchvision name (downsample.0/1 included) and name what does not fit.

mod common;

use stpm::model::weights::load_backbone;
use stpm::model::{Backbone, BackboneKind, compute_device, to_vec};

#[path = "common/pth.rs"]
mod pth;

fn synthetic_state_dict() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    pth::resnet18_layout()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            // Distinct, recognisable values per tensor; variances stay positive.
            let values = (0..n)
                .map(|j| 0.5 + (i as f32) * 0.01 + (j % 7) as f32 * 0.001)
                .collect();
            (name, shape, values)
        })
        .collect()
}

#[test]
fn torchvision_state_dict_loads_including_shortcuts() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("resnet18.pth");
    let tensors = synthetic_state_dict();
    pth::write_state_dict(&path, &tensors);

    let backbone = load_backbone(BackboneKind::ResNet18, &path, &compute_device()).expect("load");
    let Backbone::ResNet18(net) = backbone else {
        panic!("wrong variant")
    };
    let expect = |name: &str| {
        tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .expect(name)
            .2
            .clone()
    };
    let down = net.layer3[0]
        .downsample
        .as_ref()
        .expect("layer3.0 has a shortcut projection");
    assert_eq!(
        to_vec(down.conv.weight.val()),
        expect("layer3.0.downsample.0.weight")
    );
    assert_eq!(
        to_vec(down.bn.running_var.value()),
        expect("layer3.0.downsample.1.running_var")
    );
    assert_eq!(
        to_vec(down.bn.gamma.val()),
        expect("layer3.0.downsample.1.weight")
    );
    assert_eq!(
        to_vec(net.layer2[1].conv2.weight.val()),
        expect("layer2.1.conv2.weight")
    );
    assert_eq!(to_vec(net.bn1.beta.val()), expect("bn1.bias"));
}

#[test]
fn misshaped_and_missing_keys_are_named() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("broken.pth");
    let mut tensors: Vec<_> = synthetic_state_dict()
        .into_iter()
        .filter(|(name, _, _)| name != "layer1.1.bn2.running_mean")
        .collect();
    for (name, shape, values) in &mut tensors {
        if name == "layer2.0.conv1.weight" {
            *shape = vec![128, 32, 3, 3];
            values.truncate(128 * 32 * 9);
        }
    }
    tensors.push(("head.extra.weight".into(), vec![2], vec![1.0, 2.0]));
    pth::write_state_dict(&path, &tensors);

    let error =
        load_backbone(BackboneKind::ResNet18, &path, &compute_device()).expect_err("must not load");
    let message = error.to_string();
    println!("{message}");
    assert!(
        message.contains("layer1.1.bn2.running_mean"),
        "missing key named: {message}"
    );
    assert!(
        message.contains("layer2.0.conv1.weight"),
        "mis-shaped key named: {message}"
    );
    assert!(
        message.contains("head.extra.weight"),
        "unexpected key named: {message}"
    );
    assert!(
        !message.contains("layer4.0.conv1.weight"),
        "layer4 is unused by design, not unexpected: {message}"
    );
}
