#!/usr/bin/env bash
# Makes the Debian base image `localhost/debian:bookworm` without a container registry: a minbase
# root filesystem from this machine's configured Debian mirror (read from its apt sources) by
# mmdebstrap, imported into Podman. deploy/test-container.sh passes it to deploy/Containerfile as
# BASE (the base of both stages). Needs root and the Debian packages podman and mmdebstrap.
#   bash deploy/base-image.sh [IMAGE]      # default localhost/debian:bookworm
set -euo pipefail
image="${1:-localhost/debian:bookworm}"
suite=bookworm

if podman image exists "$image"; then
    echo "base-image: $image is there"
    exit 0
fi

# The first Debian mirror apt uses: deb822 files (URIs:, for a Suites: line naming the suite)
# first, then one-line `deb URL SUITE …` entries. Never a hard-coded mirror.
mirror="$(python3 - "$suite" <<'PY'
import glob, re, sys
suite = sys.argv[1]
def deb822(path):
    for stanza in re.split(r"\n\s*\n", open(path, encoding="utf-8", errors="replace").read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.split()
        if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                and fields.get("enabled", ["yes"])[0].lower() != "no"):
            yield from fields.get("uris", [])
def one_line(path):
    for line in open(path, encoding="utf-8", errors="replace"):
        parts = re.sub(r"\[[^]]*\]", "", line).split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
            yield parts[1]
found = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    found += deb822(path)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        found += one_line(path)
    except FileNotFoundError:
        pass
if not found:
    sys.exit(f"no Debian mirror for {suite} in /etc/apt/sources.list(.d)")
print(found[0])
PY
)"
echo "base-image: $suite minbase from $mirror"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The certificate authorities this machine adds to Debian's (a site's own, or a TLS-inspecting
# proxy's, /usr/local/share/ca-certificates) go into the base too, so that the builds in it reach
# crates.io and PyPI as this machine does; the Debian package ca-certificates picks them up.
mmdebstrap --variant=minbase --quiet \
    --customize-hook='mkdir -p "$1/usr/local/share/ca-certificates" && for c in /usr/local/share/ca-certificates/*.crt; do [ -f "$c" ] && cp "$c" "$1/usr/local/share/ca-certificates/"; done; true' \
    "$suite" "$tmp/rootfs.tar" "deb $mirror $suite main" "deb $mirror $suite-updates main"
podman import --quiet \
    --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tmp/rootfs.tar" "$image" >/dev/null
echo "base-image: $image ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec) )"
