#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh Debian/Ubuntu machine: setup, a small demo
# model trained on frames of the generated conveyor, its evaluation and INT8 export, then the live
# pipeline (pipelines/demo.toml: conveyor → CPU engine → annotated recording + alert events) until
# Ctrl-C.
#   STPM_DEMO_FRAMES=N bash scripts/demo.sh   # stop the live part after N frames
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/setup.sh
stpm="$repo/target/release/stpm"
data="$repo/engines/demo-conveyor"
bundle="$repo/engines/demo"

if [ ! -d "$data/train/good" ]; then
    "$stpm" devset --conveyor --out "$data" --size 256 --train 40 --test-good 10 --test-per-defect 5 --seed 1
fi
"$stpm" train --data "$data" --out "$bundle" --epochs 4 --seed 1
"$stpm" eval --model "$bundle" --data "$data" --out "$repo/engines/demo-report"
# The INT8 graph (a few seconds): `precision = "auto"` runs it on the CPU.
"$stpm" export --model "$bundle" --precision int8 --quiet

# The local MQTT broker the demo publishes to (installed by setup; systemd usually runs it already).
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    "$mosquitto_bin" -d -p 1883 || echo "warning: could not start mosquitto; alerts will wait in spool/" >&2
    sleep 0.5
fi

echo
echo "live pipeline: pipelines/demo.toml (recordings in $repo/recordings; Ctrl-C to stop)"
echo "  watch:   gst-launch-1.0 rtspsrc location=rtsp://127.0.0.1:8554/line1 latency=0 ! decodebin ! autovideosink"
echo "           (or ffplay -rtsp_transport tcp rtsp://127.0.0.1:8554/line1)"
echo "  console: http://127.0.0.1:9090/ (live video, events as they happen, clips, snapshots, verdicts; API at /api/events)"
echo "  metrics: curl http://127.0.0.1:9090/metrics   health: curl http://127.0.0.1:9090/health"
echo "  alerts:  mosquitto_sub -h 127.0.0.1 -t 'stpm/#' -v"
if [ -n "${STPM_DEMO_FRAMES:-}" ]; then
    sed "s|test://conveyor\"|test://conveyor?frames=${STPM_DEMO_FRAMES}\"|" pipelines/demo.toml > "$repo/engines/demo-run.toml"
    exec "$stpm" run --pipeline "$repo/engines/demo-run.toml"
fi
exec "$stpm" run --pipeline pipelines/demo.toml
