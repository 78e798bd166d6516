#!/usr/bin/env bash
# Soak test of `stpm run`: two generated conveyor cameras, recordings in 60-s segments, retention,
# RTSP with an RTSP client that disconnects and reconnects, and an MQTT broker that is restarted
# every few minutes. Samples the run's resident memory, open file descriptors and threads, and
# prints them at the start and end with their slope (least squares over the samples after the
# first minute, when the run has warmed up).
#
#   scripts/soak.sh [--duration SECONDS] [--sample SECONDS] [--model BUNDLE] [--out DIR] [--check]
#
# --duration   how long the run lasts (default 3600)
# --sample     seconds between samples (default 15)
# --model      the bundle (default: a tiny 64-px conveyor model trained in DIR first, seconds)
# --out        where the pipeline, logs, samples.csv and recordings go (default: a new temp folder)
# --check      exit 1 when the run ended early, did not stop cleanly, or its descriptors or threads
#              grew by more than 50 over the run (what CI runs, briefly)
# Needs what scripts/setup.sh installs (mosquitto, GStreamer) and target/release/stpm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

duration=3600 sample=15 model="" out="" check=0
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration=$2; shift 2 ;;
        --sample) sample=$2; shift 2 ;;
        --model) model=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --check) check=1; shift ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
stpm=$PWD/target/release/stpm
[ -x "$stpm" ] || { echo "build first: cargo build --release" >&2; exit 2; }
[ -n "$out" ] || out=$(mktemp -d /tmp/stpm-soak.XXXXXX)
mkdir -p "$out"
out=$(cd "$out" && pwd)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt_port=$(free_port) rtsp_port=$(free_port) http_port=$(free_port)

if [ -z "$model" ]; then
    model=$out/model
    if [ ! -f "$model/stpm.toml" ]; then
        echo "soak: training a tiny conveyor model in $model"
        "$stpm" devset --conveyor --out "$out/devset" --size 64 --train 8 --test-good 2 \
            --test-per-defect 1 > "$out/train.log" 2>&1
        "$stpm" train --data "$out/devset" --out "$model" --epochs 1 --batch-size 4 \
            --image-size 64 --quiet >> "$out/train.log" 2>&1
    fi
fi
model=$(cd "$model" && pwd)

cat > "$out/soak.toml" <<EOF
[model]
bundle = "$model"
provider = "cpu"

[[camera]]
name = "cam1"
source = "test://conveyor?fps=10"

[[camera]]
name = "cam2"
source = "test://conveyor?fps=10"

[output.record]
enabled = true
dir = "$out/recordings"
segment_seconds = 60

[output.rtsp]
enabled = true
port = $rtsp_port

[http]
enabled = true
bind = "127.0.0.1:$http_port"

[mqtt]
port = $mqtt_port
prefix = "soak"

[alerts]
spool_dir = "$out/data/spool"

[storage]
path = "$out/data"
max_size = "200MB"
EOF

mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$mosquitto" ] || { echo "soak: mosquitto is missing (scripts/setup.sh installs it)" >&2; exit 2; }
broker_pid="" client_pid="" run_pid=""
start_broker() {
    "$mosquitto" -p "$mqtt_port" >> "$out/broker.log" 2>&1 &
    broker_pid=$!
}
start_client() {
    gst-launch-1.0 -q rtspsrc location="rtsp://127.0.0.1:$rtsp_port/cam1" latency=0 \
        ! fakesink sync=false > /dev/null 2>&1 &
    client_pid=$!
}
cleanup() {
    for pid in $client_pid $broker_pid $run_pid; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

start_broker
"$stpm" run --pipeline "$out/soak.toml" > "$out/run.log" 2>&1 &
run_pid=$!
echo "soak: stpm run (pid $run_pid) for $duration s; samples every $sample s in $out/samples.csv"
echo "seconds,rss_kb,fds,threads" > "$out/samples.csv"

start=$(date +%s) next_client=0 next_broker=240 next_sample=0 ended_early=0
while :; do
    now=$(( $(date +%s) - start ))
    [ "$now" -ge "$duration" ] && break
    if ! kill -0 "$run_pid" 2>/dev/null; then ended_early=1; break; fi
    if [ "$now" -ge "$next_client" ]; then
        # The RTSP client: connected for 20 s, away for 10 s.
        if [ -n "$client_pid" ]; then kill "$client_pid" 2>/dev/null || true; wait "$client_pid" 2>/dev/null || true; client_pid=""; next_client=$((now + 10))
        else start_client; next_client=$((now + 20)); fi
    fi
    if [ "$now" -ge "$next_broker" ]; then
        kill "$broker_pid" 2>/dev/null || true; wait "$broker_pid" 2>/dev/null || true
        sleep 5
        start_broker
        next_broker=$((now + 240))
    fi
    if [ "$now" -ge "$next_sample" ]; then
        rss=$(awk '/^VmRSS/ {print $2}' "/proc/$run_pid/status" 2>/dev/null || echo 0)
        threads=$(awk '/^Threads/ {print $2}' "/proc/$run_pid/status" 2>/dev/null || echo 0)
        fds=$(ls "/proc/$run_pid/fd" 2>/dev/null | wc -l)
        echo "$now,$rss,$fds,$threads" >> "$out/samples.csv"
        next_sample=$((now + sample))
    fi
    sleep 1
done

stopped_cleanly=0
if [ "$ended_early" = 0 ]; then
    kill -TERM "$run_pid"
    if wait "$run_pid"; then stopped_cleanly=1; fi
fi
run_pid=""

python3 - "$out/samples.csv" "$ended_early" "$stopped_cleanly" "$check" "$out/run.log" <<'EOF'
import csv, sys
rows = [tuple(int(v) for v in r.values()) for r in csv.DictReader(open(sys.argv[1]))]
ended_early, clean, check = sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4] == "1"
panicked = "panicked" in open(sys.argv[5], errors="replace").read()
if len(rows) < 2:
    sys.exit("soak: fewer than 2 samples")
warm = [r for r in rows if r[0] >= 60] or rows
def slope(i):
    xs = [r[0] / 3600 for r in warm]; ys = [r[i] for r in warm]
    n = len(xs); mx = sum(xs) / n; my = sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
first, last = warm[0], rows[-1]
print(f"soak: {last[0]} s, {len(rows)} samples; from {first[0]} s to the end:")
print(f"  RSS      {first[1] / 1024:8.1f} -> {last[1] / 1024:8.1f} MiB   slope {slope(1) / 1024:+8.2f} MiB/h")
print(f"  fds      {first[2]:8d} -> {last[2]:8d}       slope {slope(2):+8.2f} /h")
print(f"  threads  {first[3]:8d} -> {last[3]:8d}       slope {slope(3):+8.2f} /h")
print(f"  ended early: {'yes' if ended_early else 'no'}; stopped cleanly on SIGTERM: {'yes' if clean else 'no'}; panics: {'yes' if panicked else 'none'}")
if check:
    problems = []
    if ended_early:
        problems.append("the run ended before the soak did")
    if not clean:
        problems.append("the run did not exit 0 on SIGTERM")
    if panicked:
        problems.append("the run panicked (run.log)")
    for name, i in (("descriptors", 2), ("threads", 3)):
        if last[i] - first[i] > 50:
            problems.append(f"{name} grew by {last[i] - first[i]}")
    if problems:
        sys.exit("soak: " + "; ".join(problems))
EOF
echo "soak: logs in $out (run.log, samples.csv)"
