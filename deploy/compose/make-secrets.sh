#!/usr/bin/env bash
# Writes the compose stack's secrets into deploy/compose/secrets/ (git-ignored) and prints the
# passwords once: the console user `operator` (HTTP Basic, argon2 hash; needs Debian's `argon2`),
# the RTSP user `viewer`, and Prometheus' scrape token (stpm keeps only its SHA-256).
#   bash deploy/compose/make-secrets.sh [DIR]    # default deploy/compose/secrets
set -euo pipefail
dir="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/secrets}"
command -v argon2 >/dev/null || { echo "needs argon2: sudo apt-get install argon2" >&2; exit 1; }
mkdir -p "$dir"
umask 077
random() { head -c 18 /dev/urandom | base64 | tr -d '/+='; }
console="$(random)"; rtsp="$(random)"; token="$(random)"
printf 'operator:%s\n' "$(printf '%s' "$console" | argon2 "$(random)" -id -e)" > "$dir/console-passwords"
printf '%s\n' "$rtsp" > "$dir/rtsp-password"
printf '%s' "$token" > "$dir/scrape-token"
printf '%s' "$token" | sha256sum | cut -d' ' -f1 > "$dir/scrape-token-sha256"
# The stpm container runs as uid 10001; the files must be readable by it.
chmod 644 "$dir"/*
echo "console: http://localhost:9090/  user operator  password $console"
echo "rtsp:    rtsp://viewer:$rtsp@localhost:8554/line1"
echo "secrets in $dir"
