#!/usr/bin/env bash
# The main job: build forkd, provide numpy to the zygote (project-local venv),
# start a private daemon and run 100 isolated sandboxes, each executing the
# numpy snippet; prints their outputs and a latency summary. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh
cargo build --release --workspace --quiet
N=${N:-100}
exec target/release/forkd-run --embedded --python "$PWD/.venv/bin/python" --preload numpy \
    --warm-pool "$N" -n "$N" --expect '[0.0, 0.0, 0.0, 0.0, 0.0]' \
    -c 'import numpy; print(numpy.zeros(5).tolist())'
