#!/usr/bin/env bash
# Installs those of the named Debian packages that are not installed yet (apt-get update first;
# sudo when not root). scripts/setup.sh and the deploy/ checks use it.
#   bash scripts/apt-install.sh PACKAGE...
set -euo pipefail
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "Debian packages already installed"
    exit 0
fi
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo_cmd apt-get update -qq
$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
