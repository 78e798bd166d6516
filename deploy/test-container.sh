#!/usr/bin/env bash
# Builds the CPU image from deploy/Containerfile with Podman and runs it the way a user would, then
# checks it from the host (CI runs this):
#   - the base is made here (deploy/base-image.sh: mmdebstrap from the configured Debian mirror)
#     and is both stages' base (BASE); the build stage uses this machine's Rust toolchain, mounted
#     (no container registry and no Rust download);
#   - the image's default command (the demo) runs with --network host next to a mosquitto
#     container: /health on 127.0.0.1:9090 answers 200, an RTSP client decodes the annotated
#     stream from 127.0.0.1:8554, an MQTT subscriber receives an alert event, the image's
#     HEALTHCHECK passes, the process runs as uid 10001, and `podman stop` ends it with status 0.
# Prints the image size and the build time. Needs root (apt-get, podman).
#   bash deploy/test-container.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '\033[1m[container-test]\033[0m %s\n' "$*"; }

bash scripts/apt-install.sh podman buildah mmdebstrap runc gstreamer1.0-tools mosquitto-clients \
    curl argon2

tmp="$(mktemp -d)"
# crun fails on this kind of machine's cgroups: runc, and ulimits a container may have.
if [ -z "${CONTAINERS_CONF:-}" ]; then
    cat > "$tmp/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF="$tmp/containers.conf"
fi
remove_containers() {
    podman rm --force --ignore -t 5 stpm-test stpm-test-mqtt stpm-test-compose >/dev/null 2>&1 || true
    podman volume rm --force stpm-test-data >/dev/null 2>&1 || true
}
cleanup() {
    remove_containers
    [ -n "${sub_pid:-}" ] && kill "$sub_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
remove_containers  # left by an earlier run that was killed

bash deploy/base-image.sh localhost/debian:bookworm
sysroot="$(rustc --print sysroot)"
say "building localhost/stpm:latest (Rust from $sysroot)"
start=$SECONDS
podman build --quiet --format docker -f deploy/Containerfile \
    --build-arg BASE=localhost/debian:bookworm -v "$sysroot:/opt/rust:ro" \
    -t localhost/stpm:latest . >/dev/null
build_seconds=$((SECONDS - start))
size="$(podman image inspect --format '{{.Size}}' localhost/stpm:latest)"
say "image localhost/stpm:latest: $(numfmt --to=iec "$size")B ($size bytes), built in ${build_seconds}s"

say "building the broker image localhost/mosquitto:test"
printf '%s\n' 'FROM localhost/debian:bookworm' \
    'RUN apt-get update && apt-get install -y --no-install-recommends mosquitto && rm -rf /var/lib/apt/lists/*' \
    'USER mosquitto' > "$tmp/Containerfile.mosquitto"
podman build --quiet -f "$tmp/Containerfile.mosquitto" -t localhost/mosquitto:test "$tmp" >/dev/null

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 9090 8554; do
    port_free "$port" || { echo "port $port is taken on this host; the image's demo serves there" >&2; exit 1; }
done
mqtt_port=1883
sets=()
if ! port_free "$mqtt_port"; then
    mqtt_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    sets=(--set "mqtt.port=$mqtt_port")
fi
podman run -d --name stpm-test-mqtt --network host localhost/mosquitto:test \
    /usr/sbin/mosquitto -p "$mqtt_port" >/dev/null
for _ in $(seq 100); do port_free "$mqtt_port" || break; sleep 0.2; done
port_free "$mqtt_port" && { podman logs stpm-test-mqtt >&2; echo "the broker container did not listen" >&2; exit 1; }
mosquitto_sub -h 127.0.0.1 -p "$mqtt_port" -t 'stpm/+/events' -C 1 -W 900 > "$tmp/event.json" &
sub_pid=$!

say "running the image's default command (the demo; it trains its model first)"
podman run -d --name stpm-test --network host -v stpm-test-data:/var/lib/stpm \
    localhost/stpm:latest demo "${sets[@]}" >/dev/null
container=stpm-test  # the one whose log a failure shows
fail() {
    echo "container-test: $*" >&2
    podman logs --tail 60 "$container" >&2 || true
    exit 1
}
wait_healthy() { # port seconds: until /health on 127.0.0.1:port answers 200
    local deadline=$((SECONDS + $2))
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/health")" = 200 ]; do
        [ "$(podman inspect --format '{{.State.Running}}' "$container")" = true ] \
            || fail "$container stopped"
        [ $SECONDS -lt $deadline ] || fail "/health on port $1 did not answer 200 within $2 s"
        sleep 2
    done
}
wait_healthy 9090 900
say "/health: 200 after $((SECONDS - start - build_seconds))s"

[ "$(podman exec stpm-test id -u)" = 10001 ] || fail "the process does not run as uid 10001"

# Decodes up to `count` frames of RTSP `url` into $tmp/frame-*.jpg and prints how many there are.
# gst-launch's status is not used: after the EOS, rtspsrc's PAUSE/TEARDOWN may meet a closed
# connection and report an error although every frame arrived.
decode_rtsp() { # url count
    rm -f "$tmp"/frame-*.jpg
    timeout 60 gst-launch-1.0 -q rtspsrc location="$1" protocols=tcp latency=0 \
        ! rtph264depay ! h264parse ! avdec_h264 ! identity eos-after="$2" ! videoconvert ! jpegenc \
        ! multifilesink location="$tmp/frame-%03d.jpg" > "$tmp/rtsp.log" 2>&1 || true
    find "$tmp" -name 'frame-*.jpg' -size +1k | wc -l
}
frames=$(decode_rtsp rtsp://127.0.0.1:8554/line1 30)
[ "$frames" -ge 25 ] || fail "the RTSP client decoded $frames frames, expected 30: $(cat "$tmp/rtsp.log")"
say "RTSP: $frames frames decoded from rtsp://127.0.0.1:8554/line1"

wait "$sub_pid" || fail "no alert event on MQTT stpm/+/events"
sub_pid=""
grep -q '"camera":"line1"' "$tmp/event.json" || fail "the MQTT message is not an event of line1: $(cat "$tmp/event.json")"
say "MQTT: event $(head -c 160 "$tmp/event.json")…"

podman healthcheck run stpm-test || fail "the image's HEALTHCHECK failed"
say "HEALTHCHECK: healthy"

podman stop -t 30 stpm-test >/dev/null
code="$(podman inspect --format '{{.State.ExitCode}}' stpm-test)"
[ "$code" = 0 ] || fail "stpm exited $code after podman stop"
say "podman stop: exit 0"

# The compose stack's stpm service, on a bridge network with published ports: the compose
# pipeline (every interface, so passwords on) and secrets from make-secrets.sh, the model trained
# above (same volume).
say "the compose service's settings: bridge network, published ports, [http.auth], RTSP password"
bash deploy/compose/make-secrets.sh "$tmp/secrets" > "$tmp/secrets.txt"
rtsp_url="$(grep -o 'rtsp://[^ ]*' "$tmp/secrets.txt" | sed 's/localhost:8554/127.0.0.1:18554/')"
token="$(cat "$tmp/secrets/scrape-token")"
podman run -d --name stpm-test-compose -p 127.0.0.1:19090:9090 -p 127.0.0.1:18554:8554 \
    -v stpm-test-data:/var/lib/stpm -v "$PWD/deploy/compose/pipeline.toml:/etc/stpm/pipeline.toml:ro" \
    -v "$tmp/secrets:/run/secrets:ro" localhost/stpm:latest demo --pipeline /etc/stpm/pipeline.toml >/dev/null
container=stpm-test-compose
wait_healthy 19090 300
status="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:19090/metrics)"
[ "$status" = 401 ] || fail "/metrics without the token answered $status, expected 401"
# The frame counter appears with the first analysed frame, which can come after /health; the answer
# is read whole before grep (with pipefail, `curl | grep -q` fails when grep stops reading early).
metrics=""
for _ in $(seq 30); do
    metrics="$(curl -sf -H "Authorization: Bearer $token" http://127.0.0.1:19090/metrics)" || true
    grep -q '^stpm_frames_total' <<<"$metrics" && break
    sleep 1
done
grep -q '^stpm_frames_total' <<<"$metrics" \
    || fail "/metrics with the scrape token: no stpm_frames_total after 30 s (answer: ${metrics:0:200})"
status="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" http://127.0.0.1:19090/api/cameras)"
[ "$status" = 403 ] || fail "/api/cameras with the scrape token answered $status, expected 403 (it may read only /metrics)"
frames=$(decode_rtsp rtsp://127.0.0.1:18554/line1 3)
[ "$frames" = 0 ] || fail "RTSP without the password was served ($frames frames)"
frames=$(decode_rtsp "$rtsp_url" 10)
[ "$frames" -ge 8 ] || fail "RTSP with the password decoded $frames frames: $(cat "$tmp/rtsp.log")"
say "published ports: /health 200, /metrics 401 without and 200 with the token (the API 403 with it), RTSP refused without and $frames frames with the password"
podman stop -t 30 stpm-test-compose >/dev/null
say "passed (image $(numfmt --to=iec "$size")B, build ${build_seconds}s)"
