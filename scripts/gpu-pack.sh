#!/usr/bin/env bash
# Packs what a GPU machine needs to run scripts/gpu-check.sh with prebuilt binaries, in two parts
# that each fit a transfer of at most 64 MiB (the working tree that travels included), for a
# machine like the team's H200 (Ubuntu 24.04, CUDA 13 libraries, no GStreamer or OpenCV, no
# internet):
#
#   call1/  onnxruntime.tar.xz: ONNX Runtime $ORT_VERSION from the PyPI onnxruntime-gpu wheel
#           (libonnxruntime.so.N, the shared, CUDA and TensorRT provider libraries; the CUDA
#           provider cut to sm_$STPM_PACK_SM with scripts/strip_cuda_fatbin.py), and unpack.sh.
#   call2/  stpm-gpu.tar.xz: the `--features gpu` builds of stpm and of its lib tests (stripped),
#           wrappers bin/stpm and bin/stpm-lib-tests that point the library path and GStreamer at
#           the packed copies before running them, the GStreamer plugins the pipeline uses and
#           gst-plugin-scanner, the shared libraries all of these need (from `ldd`, less glibc's
#           and the GCC runtime's, which the newer system has), the teacher weights, and unpack.sh.
#
# Usage, from anywhere in the repository (binaries built here beforehand, nothing is built):
#
#   scripts/gpu-pack.sh
#
# then follow the two device calls it prints. Settings (environment):
#   STPM_BIN        the gpu build of stpm (default: target/release/stpm if it is one, else the
#                   newest such build among target/release/deps/stpm-*)
#   STPM_LIB_TESTS  the lib test binary of `cargo test --release --features gpu --lib --no-run`
#                   (default: the newest gpu lib test binary among target/release/deps/stpm-*)
#   STPM_PACK_ALLOW_CPU=1  pack binaries built without `gpu` (to try the packing only)
#   OUT_DIR         output folder (default: gpu-pack/ in the repository root; its call1/, call2/ are replaced)
#   ORT_VERSION     onnxruntime-gpu version (default 1.31.1); ORT_WHEEL a wheel already here,
#                   else it is downloaded once into STPM_PACK_CACHE (default target/gpu-pack-cache)
#   STPM_PACK_SM    CUDA architectures to keep, comma-separated (default 90: H100/H200)
#   GST_PLUGINS     GStreamer plugin names (libgst<NAME>.so) to pack (default below)
# Fails if a part does not fit in 64 MiB. Needs python3, xz, ldd, strip (binutils) and a Debian
# or Ubuntu x86-64 machine with the packages of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

limit=$((64 * 1024 * 1024))
ORT_VERSION="${ORT_VERSION:-1.31.1}"
STPM_PACK_SM="${STPM_PACK_SM:-90}"
cache="${STPM_PACK_CACHE:-$root/target/gpu-pack-cache}"
out="${OUT_DIR:-$root/gpu-pack}"
[[ "$out" == /* ]] || out="$root/$out"
# Sources: test:// through appsrc (what gpu-check.sh runs); file and RTSP through decodebin
# (playback, typefindfunctions, qtdemux of isomp4, matroskademux; rtspsrc of rtsp with rtpmanager,
# udp and rtp's depayloaders). Outputs: videoconvert (videoconvertscale), x264enc, h264parse
# (videoparsersbad), matroskamux, splitmuxsink (multifile), rtph264pay (rtp) for the RTSP server.
# videotestsrc for the lib tests. nvcodec: NVIDIA's decoders (nvh264dec, nvh265dec: NVDEC, loaded
# from the driver at run time) for H.264/H.265 files and cameras. Not libav (avdec_h264, to decode
# H.264 on the CPU): with the libraries it needs (FFmpeg's codecs and filters) part 2 measured
# 94 MiB; add it to GST_PLUGINS where a transfer takes that.
GST_PLUGINS="${GST_PLUGINS:-coreelements app videoconvertscale x264 videoparsersbad matroska \
multifile playback typefindfunctions isomp4 rtp rtpmanager rtsp udp videotestsrc nvcodec}"
gst_dir=/usr/lib/x86_64-linux-gnu/gstreamer-1.0
scanner=/usr/lib/x86_64-linux-gnu/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner
teacher=engines/teachers/efficientnet-lite0.pth

die() { echo "gpu-pack: $*" >&2; exit 1; }
for tool in python3 xz ldd strip tar; do
    command -v "$tool" >/dev/null || die "needs $tool"
done

# A gpu build links cudarc; a libtest harness knows --test-threads; the lib's tests are named
# module::tests::name (the bin's unit test binary has none).
is_gpu() { grep -qa cudarc "$1"; }
is_harness() { grep -qa -- '--test-threads' "$1"; }
is_lib_tests() { is_harness "$1" && grep -qa '::tests::' "$1"; }
newest() {  # newest file among target/release/deps/stpm-* executables that passes "$@"
    local f
    while IFS= read -r f; do
        [[ -f "$f" && -x "$f" && "$f" != *.d ]] || continue
        "$@" "$f" && { echo "$f"; return; }
    done < <(ls -t target/release/deps/stpm-* 2>/dev/null)
    return 0
}
is_gpu_bin() { is_gpu "$1" && ! is_harness "$1"; }
is_gpu_lib_tests() { is_gpu "$1" && is_lib_tests "$1"; }

allow_cpu="${STPM_PACK_ALLOW_CPU:-0}"
bin="${STPM_BIN:-}"
if [[ -z "$bin" ]]; then
    if [[ -x target/release/stpm ]] && is_gpu target/release/stpm; then
        bin=target/release/stpm
    else
        bin="$(newest is_gpu_bin)"
        [[ -n "$bin" ]] && echo "note: target/release/stpm is not a gpu build; using $bin"
    fi
    if [[ -z "$bin" && "$allow_cpu" == 1 ]]; then bin=target/release/stpm; fi
fi
tests="${STPM_LIB_TESTS:-}"
if [[ -z "$tests" ]]; then
    tests="$(newest is_gpu_lib_tests)"
    if [[ -z "$tests" && "$allow_cpu" == 1 ]]; then tests="$(newest is_lib_tests)"; fi
fi
[[ -n "$bin" && -x "$bin" ]] \
    || die "no gpu build of stpm: run cargo build --release --features gpu, or set STPM_BIN"
[[ -n "$tests" && -x "$tests" ]] \
    || die "no gpu lib test binary: run cargo test --release --features gpu --lib --no-run, or set STPM_LIB_TESTS"
for f in "$bin" "$tests"; do
    if ! is_gpu "$f"; then
        [[ "$allow_cpu" == 1 ]] || die "$f is not a --features gpu build (STPM_PACK_ALLOW_CPU=1 packs it anyway)"
        echo "WARNING: $f is not a --features gpu build; packing it anyway (STPM_PACK_ALLOW_CPU=1)"
    fi
done
is_lib_tests "$tests" || die "$tests is not a lib test binary"
[[ -f "$teacher" ]] || die "missing $teacher (scripts/setup.sh fetches it)"
[[ -x "$scanner" ]] || die "missing $scanner (apt package libgstreamer1.0-0)"
echo "stpm:      $bin (built $(date -r "$bin" '+%F %T'))"
echo "lib tests: $tests (built $(date -r "$tests" '+%F %T'))"

# The working tree that travels with each call counts towards its 64 MiB: tracked files and
# untracked ones git does not ignore (the output folder aside: it must be ignored to be carried).
rel_out="${out#"$root"/}"
if [[ "$rel_out" == /* ]]; then
    echo "WARNING: $out is outside the repository: the device tool carries only paths inside it"
elif ! git check-ignore -q "$rel_out/call1/x" 2>/dev/null; then
    echo "WARNING: $rel_out/ is not ignored by git: the device tool carries only ignored paths, and"
    echo "         an untracked folder that is not ignored travels with every call (both parts, too"
    echo "         much). Ignore it first, e.g. echo /$rel_out/ >>.git/info/exclude"
fi
tree=$(git ls-files -z -co --exclude-standard 2>/dev/null | grep -zv "^$rel_out/" \
    | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1 || true)
tree=${tree:-0}

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
rm -rf "$out/call1" "$out/call2"
mkdir -p "$out/call1" "$out/call2" "$cache"

echo "== call 1: ONNX Runtime $ORT_VERSION"
cached_wheel() {
    local w
    for w in "$cache"/onnxruntime_gpu-"$ORT_VERSION"-*manylinux*x86_64.whl; do
        [[ -f "$w" ]] && { echo "$w"; return; }
    done
    return 0
}
wheel="${ORT_WHEEL:-$(cached_wheel)}"
if [[ -z "$wheel" ]]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$cache" "onnxruntime-gpu==$ORT_VERSION"
    wheel="$(cached_wheel)"
fi
[[ -f "$wheel" ]] || die "no onnxruntime-gpu $ORT_VERSION wheel"
echo "wheel: $wheel"
mkdir -p "$stage/ort"
python3 - "$wheel" "$stage/ort" "$ORT_VERSION" <<'EOF'
import os, shutil, sys, zipfile
wheel, dest, version = sys.argv[1:]
names = [f"libonnxruntime.so.{version}", "libonnxruntime_providers_shared.so",
         "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        target = os.path.join(dest, name + (".full" if "cuda" in name else ""))
        with z.open(f"onnxruntime/capi/{name}") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(target, 0o755)
EOF
python3 scripts/strip_cuda_fatbin.py "$stage/ort/libonnxruntime_providers_cuda.so.full" \
    "$stage/ort/libonnxruntime_providers_cuda.so" "$STPM_PACK_SM"
rm "$stage/ort/libonnxruntime_providers_cuda.so.full"
chmod 755 "$stage/ort/libonnxruntime_providers_cuda.so"
tar -C "$stage/ort" -cf - . | xz -9 -T0 >"$out/call1/onnxruntime.tar.xz"

echo "== call 2: stpm, its libraries, GStreamer plugins, teacher weights"
pack="$stage/stpm-gpu"
mkdir -p "$pack/bin" "$pack/libexec" "$pack/lib" "$pack/gst" "$pack/gio-modules" "$pack/teachers"
cp "$bin" "$pack/libexec/stpm"
cp "$tests" "$pack/libexec/stpm-lib-tests"
strip "$pack/libexec/stpm" "$pack/libexec/stpm-lib-tests"
cp "$scanner" "$pack/libexec/gst-plugin-scanner"
programs=(stpm stpm-lib-tests)
if inspect="$(command -v gst-inspect-1.0)"; then  # for looking at the plugins there
    cp "$inspect" "$pack/libexec/gst-inspect-1.0"
    programs+=(gst-inspect-1.0)
fi
for plugin in $GST_PLUGINS; do
    [[ -f "$gst_dir/libgst$plugin.so" ]] || die "no GStreamer plugin $gst_dir/libgst$plugin.so"
    cp "$gst_dir/libgst$plugin.so" "$pack/gst/"
done
cp "$teacher" "$pack/teachers/"
# Every library these load (ldd lists the whole tree), but glibc's and the GCC runtime's: the
# target's are newer and backward compatible, and two C libraries cannot share a process. Nor the
# NVIDIA driver's, which must be the machine's own.
system='^(linux-vdso|ld-linux|libc|libm|libmvec|libpthread|libdl|librt|libutil|libresolv|libanl|libBrokenLocale|libgcc_s|libstdc\+\+|libcuda|libnvidia-.*)\.so'
missing=0
for elf in "$pack"/libexec/* "$pack"/gst/*.so; do
    while read -r name arrow path _; do
        [[ "$arrow" == "=>" ]] || continue
        [[ "$name" =~ $system ]] && continue
        if [[ "$path" == "not" ]]; then
            echo "unresolved: $name (needed by ${elf##*/})"
            missing=1
            continue
        fi
        [[ -e "$pack/lib/$name" ]] || cp -L "$path" "$pack/lib/$name"
    done < <(ldd "$elf")
done
[[ $missing == 0 ]] || die "libraries missing here (install them first)"
for program in "${programs[@]}"; do
    cat >"$pack/bin/$program" <<EOF
#!/usr/bin/env bash
# Runs libexec/$program with the packed libraries and GStreamer plugins (scripts/gpu-pack.sh).
here="\$(cd "\$(dirname "\${BASH_SOURCE[0]}")/.." && pwd)"
export LD_LIBRARY_PATH="\$here/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export GST_PLUGIN_SYSTEM_PATH="\$here/gst" GST_PLUGIN_SYSTEM_PATH_1_0="\$here/gst"
export GST_PLUGIN_SCANNER="\$here/libexec/gst-plugin-scanner"
export GST_PLUGIN_SCANNER_1_0="\$here/libexec/gst-plugin-scanner"
export GST_REGISTRY="\$here/gst-registry.bin" GST_REGISTRY_1_0="\$here/gst-registry.bin"
export GIO_MODULE_DIR="\$here/gio-modules"
unset GST_PLUGIN_PATH GST_PLUGIN_PATH_1_0
exec "\$here/libexec/$program" "\$@"
EOF
    chmod 755 "$pack/bin/$program"
done
echo "$(find "$pack/lib" -type f | wc -l) libraries, $(find "$pack/gst" -type f | wc -l) plugins, programs: ${programs[*]}"
tar -C "$pack" -cf - . | xz -9 -T0 >"$out/call2/stpm-gpu.tar.xz"

# unpack.sh: DEST (default below); xz or else Python's lzma for the archive.
write_unpack() {  # folder, archive, default destination, what to do after
    cat >"$1/unpack.sh" <<EOF
#!/usr/bin/env bash
# Unpacks $2 (made by scripts/gpu-pack.sh) into DEST: bash unpack.sh [DEST], default $3.
set -euo pipefail
dest="\${1:-$3}"
archive="\$(dirname "\${BASH_SOURCE[0]}")/$2"
mkdir -p "\$dest"
if command -v xz >/dev/null; then
    xz -dc "\$archive" | tar -xf - -C "\$dest"
else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "\$archive" "\$dest"
fi
$4
EOF
    chmod 755 "$1/unpack.sh"
}
write_unpack "$out/call1" onnxruntime.tar.xz /tmp/stpm-ort \
    "echo \"STPM_ORT_LIB=\$dest/libonnxruntime.so.$ORT_VERSION\""
# The teacher goes where stpm train looks for it: engines/teachers/ of the repository it is run
# from (STPM_REPO, default the current folder).
write_unpack "$out/call2" stpm-gpu.tar.xz /tmp/stpm-gpu \
    "mkdir -p \"\${STPM_REPO:-.}/engines/teachers\"
[[ -e \"\${STPM_REPO:-.}/engines/teachers/efficientnet-lite0.pth\" ]] \\
    || cp \"\$dest/teachers/efficientnet-lite0.pth\" \"\${STPM_REPO:-.}/engines/teachers/\"
echo \"STPM_PREBUILT=\$dest/bin\""

echo "== sizes (each call: its part and the working tree of $((tree / 1024)) KiB, at most 64 MiB)"
fail=0
for part in call1 call2; do
    size=$(du -cb "$out/$part" | tail -1 | cut -f1)
    printf '%s: %s (%.1f MiB)\n' "$part" "$(ls "$out/$part"/*.tar.xz)" "$(echo "$size" | awk '{print $1 / 1048576}')"
    if ((size + tree > limit)); then
        echo "FAIL: $part with the working tree is $((size + tree)) bytes, over 64 MiB"
        fail=1
    fi
done
((fail == 0)) || exit 1

cat <<EOF
== next: two device calls, the second right after the first (the machine stays warm only a short
   while between calls; if the first call's files are gone, run both again)
1. run with carry ["$rel_out/call1"], command:
     bash $rel_out/call1/unpack.sh /tmp/stpm-ort
2. run with carry ["$rel_out/call2"], command:
     test -e /tmp/stpm-ort/libonnxruntime.so.$ORT_VERSION || { echo 'call 1 files gone: rerun call 1'; exit 1; }; bash $rel_out/call2/unpack.sh /tmp/stpm-gpu && STPM_PREBUILT=/tmp/stpm-gpu/bin STPM_ORT_LIB=/tmp/stpm-ort/libonnxruntime.so.$ORT_VERSION bash scripts/gpu-check.sh
EOF
