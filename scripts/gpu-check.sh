#!/usr/bin/env bash
# GPU check (issue 6), for a machine with an NVIDIA GPU and driver; first increment: builds the
# `gpu` feature, runs its tests (kernel vs CPU twin on every format, max abs diff ≤ 1e-3; CUDA
# context), then `stpm bench --provider auto|cuda|tensorrt` on a small demo bundle, so the log shows
# which provider ran and why. Needs ONNX Runtime with the CUDA/TensorRT providers (PyPI
# onnxruntime-gpu; 1.31.1 is its newest release) via STPM_ORT_LIB for the provider runs.
# A GPU-only test that finds no GPU prints SKIPPED: on this machine that is a failure, so grep says so.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-/tmp}/gpu-check"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
STPM_SKIP_APT="${STPM_SKIP_APT:-1}" STPM_NVRTC=1 bash scripts/setup.sh >"$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
cargo build --release --locked --features gpu 2>&1 | tail -3
cargo test --release --locked --features gpu --lib -- gpu:: engine::provider --nocapture 2>&1 | tee "$out/tests.log"
if grep -q SKIPPED "$out/tests.log"; then echo "FAIL: a GPU test skipped on a GPU machine"; fi
stpm=target/release/stpm
work="$(mktemp -d)"
"$stpm" devset --out "$work/data" >/dev/null
"$stpm" train --data "$work/data" --out "$work/bundle" --epochs 1 --image-size 256 --quiet
for provider in auto cuda tensorrt; do
    echo "== bench --provider $provider"
    timeout 300 "$stpm" bench --model "$work/bundle" --frames 50 --provider "$provider" 2>&1 | tee "$out/bench-$provider.txt"
done
