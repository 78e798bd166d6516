#!/usr/bin/env python3
"""Converts the Magnetic Tile Defect dataset into an MVTec-layout category for `stpm train/eval`.

The dataset (Huang, Qiu and Yuan, "Surface defect saliency of magnetic tile", The Visual
Computer, 2020; github.com/abin24/Magnetic-tile-defect-datasets.) has `MT_<Class>/Imgs/<stem>.jpg`
with a same-stem `.png` mask; `MT_Free` holds the good tiles. It has no licence file: use it for
evaluation only and never commit its images.

    python3 scripts/dev/mt_to_mvtec.py --src MT_REPO --out DIR/mt --seed N

writes DIR/mt/train/good (80 % of MT_Free, chosen by a shuffle seeded with N), test/good (the
rest), test/<kind>/<stem>.jpg and ground_truth/<kind>/<stem>_mask.png (masks thresholded at 127)
for each defect class (blowhole, break, crack, fray, uneven).

Needs numpy and Pillow.
"""
import argparse
import os
import random
import shutil
import sys

import numpy as np
from PIL import Image


def stems(folder):
    """The stems of a class folder's images (jpg with a same-stem png beside them), sorted."""
    imgs = os.path.join(folder, "Imgs")
    if not os.path.isdir(imgs):
        sys.exit(f"{imgs} is missing: is --src the dataset's repository?")
    return sorted(f[:-4] for f in os.listdir(imgs) if f.endswith(".jpg"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="the dataset's checkout (holds MT_Free, MT_Crack, ...)")
    ap.add_argument("--out", required=True, help="the category folder to write (must not exist)")
    ap.add_argument("--seed", type=int, required=True, help="split seed for MT_Free")
    ap.add_argument("--train-share", type=float, default=0.8)
    args = ap.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists; choose a new folder")

    free = stems(os.path.join(args.src, "MT_Free"))
    random.Random(args.seed).shuffle(free)
    n_train = round(len(free) * args.train_share)
    split = {"train/good": free[:n_train], "test/good": free[n_train:]}
    for dest, names in split.items():
        os.makedirs(os.path.join(args.out, dest))
        for s in names:
            shutil.copy(os.path.join(args.src, "MT_Free", "Imgs", s + ".jpg"), os.path.join(args.out, dest))
    counts = {k: len(v) for k, v in split.items()}

    classes = sorted(d for d in os.listdir(args.src) if d.startswith("MT_") and d != "MT_Free")
    for cls in classes:
        kind = cls[3:].lower()
        src = os.path.join(args.src, cls, "Imgs")
        test = os.path.join(args.out, "test", kind)
        gt = os.path.join(args.out, "ground_truth", kind)
        os.makedirs(test)
        os.makedirs(gt)
        names = stems(os.path.join(args.src, cls))
        for s in names:
            shutil.copy(os.path.join(src, s + ".jpg"), test)
            mask = np.asarray(Image.open(os.path.join(src, s + ".png")).convert("L")) > 127
            Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(gt, s + "_mask.png"))
        counts[f"test/{kind}"] = len(names)
    for k, v in counts.items():
        print(f"{k}: {v} images")


if __name__ == "__main__":
    main()
