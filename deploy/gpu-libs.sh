#!/usr/bin/env bash
# The GPU image's libraries, from PyPI wheels (deploy/Containerfile, VARIANT=gpu):
# ONNX Runtime's GPU build (CUDA and TensorRT providers) and the CUDA 12 user-space libraries it
# and stpm's kernels load (cudart, cuBLAS, cuDNN, cuFFT, cuRAND, NVRTC); with TENSORRT=1 also
# TensorRT's libraries (several GB). The driver (libcuda) comes from the NVIDIA container runtime.
#   bash deploy/gpu-libs.sh ORT_GPU_VERSION TENSORRT(0|1) DEST
set -euo pipefail
version="$1" tensorrt="$2" dest="$3"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
download() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$tmp/wheels" "$@"
}
download "onnxruntime-gpu==$version" nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 \
    "nvidia-cudnn-cu12>=9,<10" nvidia-cufft-cu12 nvidia-curand-cu12 nvidia-cuda-nvrtc-cu12
if [ "$tensorrt" = 1 ]; then
    download tensorrt-cu12-libs
fi
mkdir -p "$dest"
for wheel in "$tmp"/wheels/*.whl; do
    # Every shared library in the wheel, flattened into DEST.
    python3 - "$wheel" "$dest" <<'PY'
import os, re, shutil, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if re.search(r"\.so(\.\d+)*$", base) and not base.startswith("onnxruntime_pybind"):
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(os.path.join(dest, base), 0o755)
PY
done
ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
ls "$dest"
