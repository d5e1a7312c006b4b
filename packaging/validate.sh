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
# The multi-node wiring (docs/e2b.md, "Several nodes"): both Services select
# the DaemonSet's pods, the peer Service is headless and [http] peer_url names
# it, and each pod's node name is its IP.
"$venv/bin/python" - packaging/kubernetes/daemonset.yaml "$tmp/configmap-forkd.toml" <<'PY'
import sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
ds = next(d for d in docs if d["kind"] == "DaemonSet")
pod = ds["spec"]["template"]
labels = pod["metadata"]["labels"]
svcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
assert set(svcs) == {"forkd-e2b", "forkd-gateway-peers"}, sorted(svcs)
for name, svc in svcs.items():
    sel = svc["spec"]["selector"]
    assert all(labels.get(k) == v for k, v in sel.items()), f"Service {name} selects no forkd pod"
    assert svc["metadata"]["namespace"] == ds["metadata"]["namespace"]
assert svcs["forkd-gateway-peers"]["spec"].get("clusterIP") == "None", "the peer Service must be headless"
http = tomllib.load(open(sys.argv[2], "rb"))["http"]
ns = ds["metadata"]["namespace"]
port = svcs["forkd-gateway-peers"]["spec"]["ports"][0]["port"]
assert http["peer_url"] == f"http://{{node}}.forkd-gateway-peers.{ns}.svc.cluster.local:{port}", http["peer_url"]
assert http["listen"].endswith(f":{port}")
c = pod["spec"]["containers"][0]
env = {e["name"]: e for e in c["env"]}
assert env["FORKD_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
assert any(p["containerPort"] == port for p in c["ports"])
mounts = {m["mountPath"] for m in c["volumeMounts"]}
assert any(http["api_keys"].startswith(m + "/") for m in mounts), "api_keys is not on a mounted volume"
PY
echo "packaging/validate.sh: the gateway's Services, peer address and node name agree"
cargo build --quiet -p forkd -p forkd-zygote # --check-config also looks for the zygote library
for config in "$tmp/configmap-forkd.toml" packaging/forkd.toml; do
    target/debug/forkd --check-config --config "$config" >/dev/null
    echo "packaging/validate.sh: $config accepted by forkd --check-config"
done
