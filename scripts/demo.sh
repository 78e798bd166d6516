#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh Debian/Ubuntu machine: setup, then a small
# demo model trained on a generated data set, then its scores on held-back good and defective images.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/setup.sh
stpm="$repo/target/release/stpm"
data="$repo/engines/demo-data"
bundle="$repo/engines/demo"

if [ ! -d "$data/train/good" ]; then
    "$stpm" devset --out "$data" --size 256 --train 40 --test-good 10 --test-per-defect 5 --seed 1
fi
"$stpm" train --data "$data" --out "$bundle" --epochs 4 --seed 1
"$stpm" eval --model "$bundle" --data "$data" --out "$repo/engines/demo-report"
