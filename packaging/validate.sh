#!/usr/bin/env bash
# Offline checks of the deployment files (no cluster is needed):
#  1. packaging/kubernetes/*.yaml against the Kubernetes API's JSON schemas, in
#     strict mode (unknown fields are errors), for the oldest and newest
#     Kubernetes versions checked here; kubernetes-validate (PyPI) ships the
#     schemas, so nothing is fetched at validation time.
#  2. that the validator does fail: a copy of the DaemonSet with a misspelt
#     field must be rejected.
#  3. forkd.toml in the ConfigMap and packaging/forkd.toml with the daemon's
#     own parser (`forkd --check-config`).
# Installs what it needs into target/deploy-venv (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-venv
validator_version=1.37.0
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$validator_version"; then
    rm -rf "$venv"
    scripts/venv.sh # the project's interpreter (installs python3-venv if missing)
    .venv/bin/python -m venv "$venv"
    timeout 300 "$venv/bin/pip" install --quiet "kubernetes-validate==$validator_version"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for version in 1.29.0 1.37.0; do
    timeout 120 "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" packaging/kubernetes/*.yaml
    echo "packaging/validate.sh: packaging/kubernetes/*.yaml valid (strict) for Kubernetes $version"
done

sed 's/terminationGracePeriodSeconds:/terminationGracePeriodSecs:/' packaging/kubernetes/daemonset.yaml >"$tmp/misspelt.yaml"
if timeout 120 "$venv/bin/kubernetes-validate" --strict --quiet "$tmp/misspelt.yaml" >"$tmp/out" 2>&1; then
    echo "packaging/validate.sh: the validator accepted a misspelt field; it checks nothing" >&2
    exit 1
fi
grep -q terminationGracePeriodSecs "$tmp/out" || { cat "$tmp/out" >&2; exit 1; }
echo "packaging/validate.sh: a misspelt field is rejected"

"$venv/bin/python" - packaging/kubernetes/daemonset.yaml "$tmp/configmap-forkd.toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"]
assert len(docs) == 1, "daemonset.yaml must hold exactly one ConfigMap"
open(sys.argv[2], "w").write(docs[0]["data"]["forkd.toml"])
PY
cargo build --quiet -p forkd -p forkd-zygote # --check-config also looks for the zygote library
for config in "$tmp/configmap-forkd.toml" packaging/forkd.toml; do
    target/debug/forkd --check-config --config "$config" >/dev/null
    echo "packaging/validate.sh: $config accepted by forkd --check-config"
done
