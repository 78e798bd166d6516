#!/usr/bin/env python3
"""Image AUROC per kind of defect, for an `stpm eval` of a dev set whose manifest.json
describes each defective image (tiny, patch donor, stain tint).

`stpm eval` reports AUROC per defect type (stain, cut_patch, ...). The dev set's manifest.json
knows more about each defective image: whether it is "tiny", which photo a cut patch came from,
the stain's tint. This splits the eval's scores.csv by those, each group against all good test
images (ties count 1/2, as in stpm eval):

    python3 scripts/dev/devset_breakdown.py --devset DEVSET --category grass --eval REPORT_DIR

Standard library only.
"""
import argparse
import csv
import json
import os
import sys


def auroc(good, defective):
    """Probability that a defective image outscores a good one (ties 1/2)."""
    if not good or not defective:
        return float("nan")
    wins = sum((d > g) + 0.5 * (d == g) for d in defective for g in good)
    return wins / (len(good) * len(defective))


def kind(info, defect_type):
    """The group of one defective image: type, tiny or not, patch donor or stain tint."""
    parts = [defect_type]
    if info.get("tiny"):
        parts.append("tiny")
    params = (info.get("params") or [{}])[0]
    if "donor" in params:
        parts.append(f"from {params['donor']}")
    if "tint" in params:
        parts.append(params["tint"])
    return " / ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devset", required=True, help="dev set folder with its manifest.json")
    ap.add_argument("--category", required=True)
    ap.add_argument("--eval", required=True, help="stpm eval --out folder (holds scores.csv)")
    args = ap.parse_args(argv)
    try:
        with open(os.path.join(args.devset, "manifest.json")) as f:
            manifest = json.load(f)
        with open(os.path.join(args.eval, "scores.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        sys.exit(f"devset_breakdown: {e}")
    images = {im["image"]: im for im in manifest.get("images", [])}
    good, groups, unknown = [], {}, []
    for row in rows:
        score = float(row["raw_score"])
        if row["defect_type"] == "good":
            good.append(score)
            continue
        key = f"{args.category}/test/{row['defect_type']}/{row['image']}"
        info = images.get(key)
        if info is None:
            unknown.append(key)
            continue
        groups.setdefault(kind(info, row["defect_type"]), []).append(score)
    if unknown:
        sys.exit(f"devset_breakdown: {len(unknown)} images of scores.csv are not in the manifest, e.g. {unknown[0]}"
                 " (another dev set or category?)")
    everything = [s for scores in groups.values() for s in scores]
    print(f"{args.category}: {len(good)} good, {len(everything)} defective, image AUROC {auroc(good, everything):.3f}")
    for name in sorted(groups):
        scores = groups[name]
        print(f"  {name:40s} n={len(scores):3d}  AUROC {auroc(good, scores):.3f}")
    not_tiny = [s for name, scores in groups.items() if "tiny" not in name.split(" / ") for s in scores]
    print(f"  {'(all but tiny)':40s} n={len(not_tiny):3d}  AUROC {auroc(good, not_tiny):.3f}")


if __name__ == "__main__":
    main()
