#!/usr/bin/env bash
# Comparison only (not used by CI or the product): OpenVINO's benchmark_app (PyPI `openvino`) on a
# bundle's model.onnx, batch 1, next to `stpm bench` on the same file, so a report can say how our
# ONNX Runtime path compares with OpenVINO on this machine (and, when the bundle has one, on its INT8
# graph).
#   bash scripts/dev/openvino_bench.sh [engines/demo]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bundle="${1:-$repo/engines/demo}"
model="$bundle/model.onnx"
[ -f "$model" ] || { echo "no $model: train a bundle first (bash scripts/demo.sh)" >&2; exit 1; }
size="$(python3 -c "import tomllib,sys; m=tomllib.load(open(sys.argv[1],'rb'))['model']['input_size']; print(f'{m[0]},{m[1]}')" "$bundle/stpm.toml")"
venv="${STPM_OPENVINO_VENV:-$repo/engines/openvino-venv}"
if [ ! -x "$venv/bin/benchmark_app" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet openvino
fi
echo "== OpenVINO $("$venv/bin/pip" show openvino | awk '/^Version/{print $2}') benchmark_app, latency hint (batch 1)"
"$venv/bin/benchmark_app" -m "$model" -d CPU -hint latency -niter 300 -shape "image[1,3,${size}]" 2>&1 \
    | grep -E "Median|Average|Throughput"
# On CPUs with AMX or avx512_bf16 OpenVINO runs an fp32 model in bf16 unless told otherwise; this
# row is the like-for-like fp32 comparison with ONNX Runtime.
echo "== OpenVINO benchmark_app, latency hint, -infer_precision f32"
"$venv/bin/benchmark_app" -m "$model" -d CPU -hint latency -niter 300 -infer_precision f32 \
    -shape "image[1,3,${size}]" 2>&1 | grep -E "Median|Average|Throughput"
echo "== OpenVINO benchmark_app, throughput hint (parallel requests)"
"$venv/bin/benchmark_app" -m "$model" -d CPU -hint throughput -t 15 -shape "image[1,3,${size}]" 2>&1 \
    | grep -E "Median|Throughput"
if [ -f "$bundle/model.int8.onnx" ]; then
    # The bundle's INT8 (QDQ) graph, as `stpm bench --precision int8` runs it.
    for hint in latency throughput; do
        echo "== OpenVINO benchmark_app on model.int8.onnx, $hint hint"
        "$venv/bin/benchmark_app" -m "$bundle/model.int8.onnx" -d CPU -hint "$hint" -t 15 \
            -shape "image[1,3,${size}]" 2>&1 | grep -E "Median|Throughput"
    done
fi
echo "== stpm bench (our ONNX Runtime session and a plain one)"
"$repo/target/release/stpm" bench --model "$bundle" --frames 60
if [ -f "$bundle/model.int8.onnx" ]; then
    echo "== stpm bench --precision int8, one session and two single-thread sessions"
    "$repo/target/release/stpm" bench --model "$bundle" --frames 60 --precision int8
    "$repo/target/release/stpm" bench --model "$bundle" --frames 60 --precision int8 --sessions 2 --threads 1
fi
