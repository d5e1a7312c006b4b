#!/bin/bash
# Entrypoint wrapper OpenSandbox's server installs in each sandbox: start the agent in the
# background, then run the sandbox's own entrypoint (default `tail -f /dev/null`).
set -e
EXECD="${EXECD:=/opt/opensandbox/execd}"
"$EXECD" &
if [ -n "${BOOTSTRAP_CMD:-}" ]; then
    exec bash -c "$BOOTSTRAP_CMD"
elif [ "${1:-}" = "-c" ]; then
    shift
    exec bash -c "$*"
elif [ $# -eq 0 ]; then
    exec bash
fi
exec "$@"
