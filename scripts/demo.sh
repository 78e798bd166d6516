#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh Debian/Ubuntu machine: setup, then
# `stpm demo`: a small demo model trained on frames of the generated conveyor (the first time, or
# again with STPM_DEMO_RETRAIN=1), its evaluation and INT8 export, then the live pipeline
# (pipelines/demo.toml: conveyor → CPU engine → annotated recording, RTSP, console, alert events)
# until Ctrl-C.
#   STPM_DEMO_FRAMES=N bash scripts/demo.sh   # stop the live part after N frames
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

bash scripts/setup.sh

# The local MQTT broker the demo publishes to (installed by setup; systemd usually runs it already).
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
    "$mosquitto_bin" -d -p 1883 || echo "warning: could not start mosquitto; alerts will wait in spool/" >&2
    sleep 0.5
fi

args=(demo)
[ -n "${STPM_DEMO_FRAMES:-}" ] && args+=(--frames "$STPM_DEMO_FRAMES")
[ -n "${STPM_DEMO_RETRAIN:-}" ] && args+=(--retrain)
exec "$repo/target/release/stpm" "${args[@]}"
