#!/usr/bin/env bash
# Measures training on the line end to end, on a running `stpm run` of the demo camera: frames
# collected through POST /api/cameras/line1/collect, `stpm train` started by POST /api/train (a
# child process at nice 10 with one thread) on them and swapped in when done, while an RTSP client
# decodes the annotated stream. Reports the time from "collect" to "new model live", the analysed
# frame rate before and during training, dropped frames, and the longest gap the RTSP client saw
# around the swap.
#
#   scripts/retrain-live.sh [--model engines/demo] [--out DIR] [--frames 150] [--every 0.5]
#                           [--threads 1] [--max-steps N]
#
# Needs the stpm binary (cargo build --release) and gst-launch-1.0 (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model=engines/demo
out=""
frames=150
every=0.5
threads=1
max_steps=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --frames) frames=$2; shift 2 ;;
        --every) every=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --max-steps) max_steps=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
stpm=$PWD/target/release/stpm
[ -x "$stpm" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -f "$model/stpm.toml" ] || { echo "$model is not a bundle (scripts/demo.sh trains engines/demo)" >&2; exit 1; }
out=${out:-$(mktemp -d /tmp/stpm-retrain.XXXXXX)}
mkdir -p "$out"
model=$(realpath "$model")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port)
rtsp=$(free_port)
cat > "$out/pipeline.toml" <<EOF
[model]
bundle = "$model"

[[camera]]
name = "line1"
source = "test://conveyor"

[output.record]
enabled = true
dir = "$out/recordings"

[output.rtsp]
enabled = true
port = $rtsp

[http]
enabled = true
bind = "127.0.0.1:$http"

[storage]
path = "$out/data"
EOF

api() { curl -sS -X "$1" "http://127.0.0.1:$http$2" ${3:+-d "$3"}; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }
sample() {
    curl -sS "http://127.0.0.1:$http/metrics" | awk -v s="$1" '$1 == s { print $2 }'
}

"$stpm" run --pipeline "$out/pipeline.toml" > "$out/run.log" 2>&1 &
run_pid=$!
client_pid=""
cleanup() {
    [ -n "$client_pid" ] && kill "$client_pid" 2>/dev/null || true
    kill -TERM "$run_pid" 2>/dev/null || true
    wait "$run_pid" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 300); do
    curl -s "http://127.0.0.1:$http/health" > /dev/null && break
    sleep 0.2
done
# The RTSP client: one arrival time (unix seconds) per decoded frame.
( gst-launch-1.0 -v rtspsrc location="rtsp://127.0.0.1:$rtsp/line1" protocols=tcp latency=0 \
    ! rtph264depay ! avdec_h264 ! identity silent=false ! fakesink sync=false 2>&1 \
  | while IFS= read -r line; do
        case "$line" in *identity*chain*) printf '%s\n' "$EPOCHREALTIME" ;; esac
    done > "$out/arrivals.txt" ) &
client_pid=$!
sleep 10

fps_series='stpm_fps{camera="line1"}'
dropped_series='stpm_frames_dropped_total{camera="line1"}'
monitor() { # phase: samples every 2 s into fps.tsv until the file $out/stop-$1 exists
    while [ ! -e "$out/stop-$1" ]; do
        printf '%s\t%s\t%s\t%s\n' "$1" "$EPOCHREALTIME" "$(sample "$fps_series")" "$(sample "$dropped_series")" >> "$out/fps.tsv"
        sleep 2
    done
}
: > "$out/fps.tsv"
t0=$EPOCHREALTIME
monitor collect & mon=$!
api POST /api/cameras/line1/collect "{\"frames\": $frames, \"every\": $every}" | grep -q '"wanted"' \
    || { echo "POST /api/cameras/line1/collect failed" >&2; exit 1; }
until [ "$(api GET /api/cameras/line1/collect | field '["done"]')" = True ]; do sleep 1; done
touch "$out/stop-collect"; wait "$mon"
t1=$EPOCHREALTIME
api GET /api/cameras/line1/collect > "$out/collect.json"
monitor train & mon=$!
request="{\"camera\": \"line1\", \"out\": \"$out/line1-model\", \"threads\": $threads${max_steps:+, \"max_steps\": $max_steps}}"
api POST /api/train "$request" | tee "$out/train-start.json" | grep -q '"state":"running"' \
    || { echo "POST /api/train failed: $(cat "$out/train-start.json")" >&2; exit 1; }
while case "$(api GET /api/train | field '["state"]')" in running|swapping) true ;; *) false ;; esac; do
    sleep 2
done
touch "$out/stop-train"; wait "$mon"
t2=$EPOCHREALTIME
api GET /api/train > "$out/train.json"
monitor after & mon=$!
sleep 20
touch "$out/stop-after"; wait "$mon"
kill "$client_pid" 2>/dev/null || true
client_pid=""

python3 - "$out" "$t0" "$t1" "$t2" <<'EOF'
import json, sys, statistics as st
out, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
train = json.load(open(f"{out}/train.json"))
collect = json.load(open(f"{out}/collect.json"))
rows = [l.split("\t") for l in open(f"{out}/fps.tsv") if l.strip()]
def fps(phase, skip=0):
    vals = [float(r[2]) for r in rows if r[0] == phase and r[2]]
    return vals[skip:]
def dropped(phase):
    vals = [float(r[3]) for r in rows if r[0] == phase and r[3]]
    return (vals[-1] - vals[0]) if len(vals) > 1 else 0.0
arrivals = [float(l) for l in open(f"{out}/arrivals.txt") if l.strip()]
gaps = [(b - a, b) for a, b in zip(arrivals, arrivals[1:])]
swap_gap = max((g for g, t in gaps if t2 - 10 <= t <= t2 + 5), default=float("nan"))
train_gap = max((g for g, t in gaps if t1 <= t <= t2), default=float("nan"))
summary = {
    "collect_seconds": round(t1 - t0, 1),
    "frames_saved": collect.get("saved"),
    "train_seconds": round(t2 - t1, 1),
    "collect_to_live_seconds": round(t2 - t0, 1),
    "train_state": train["state"],
    "model": (train.get("model") or {}).get("id"),
    "fps_collecting_mean": round(st.mean(fps("collect", 3)), 2) if fps("collect", 3) else None,
    "fps_training_mean": round(st.mean(fps("train", 3)), 2) if fps("train", 3) else None,
    "fps_training_min": round(min(fps("train", 3)), 2) if fps("train", 3) else None,
    "fps_after_mean": round(st.mean(fps("after", 3)), 2) if fps("after", 3) else None,
    "dropped_collecting": dropped("collect"),
    "dropped_training": dropped("train"),
    "rtsp_frames": len(arrivals),
    "rtsp_longest_gap_during_training_ms": round(train_gap * 1000, 1),
    "rtsp_longest_gap_around_swap_ms": round(swap_gap * 1000, 1),
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
grep -E "model: .* is live|train: done|train: epoch" "$out/run.log" | tail -5 || true
echo "files in $out"
