#!/usr/bin/env bash
# A/B perf-regression check of two builds on the same host, in one job (what
# .github/workflows/perf.yml runs on pull requests: hosted runners differ from
# the host bench/baseline.json was taken on, so the base branch is measured
# next to the pull request instead of trusting a stored baseline).
#
#   scripts/perf-ab.sh BASE_BENCH HEAD_BENCH [SUMMARY_FILE]
#
# BASE_BENCH / HEAD_BENCH: release forkd-bench binaries (each with its
# libforkd_zygote.so beside it, and libforkd_bench_floor.so in deps/ when the
# build has the independent floor; a base without it is compared on the
# no-isolation ratios, which both records carry). Records base, then head,
# and judges head with head's rule (`forkd-bench compare`). A suspected regression is re-measured
# in the opposite order (head, then base) and fails the job only if it
# repeats. Needs root; the zygotes use .venv/bin/python (scripts/venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1 head=$2 summary=${3:-/dev/null}
python="$PWD/.venv/bin/python"
out=$(mktemp -d /tmp/forkd-perf-ab.XXXXXX)
# PERF_AB_KEEP=DIR keeps the recorded runs (the workflow uploads them).
trap 'if [ -n "${PERF_AB_KEEP:-}" ]; then cp "$out"/*.json "$PERF_AB_KEEP"/ 2>/dev/null || true; fi; rm -rf "$out"' EXIT

if ! "$base" check --help >/dev/null 2>&1; then
    msg="perf A/B skipped: the base build has no \`forkd-bench check\` yet (it lands with this change)."
    echo "$msg"
    echo "$msg" >>"$summary"
    exit 0
fi

# BASE_COMMIT / HEAD_COMMIT (optional) name the builds in the records.
record() { # BIN OUT COMMIT
    FORKD_BENCH_COMMIT=$3 timeout --kill-after=30 600 "$1" check --record-only --python "$python" --out "$2"
}

record "$base" "$out/base-1.json" "${BASE_COMMIT:-}"
record "$head" "$out/head-1.json" "${HEAD_COMMIT:-}"
status=0
"$head" compare "$out/base-1.json" "$out/head-1.json" --summary "$summary" || status=$?
case $status in
0) exit 0 ;;
1) ;;
*) exit "$status" ;;
esac

echo "perf A/B: suspected regression; re-measuring in the opposite order to confirm" | tee -a "$summary"
record "$head" "$out/head-2.json" "${HEAD_COMMIT:-}"
record "$base" "$out/base-2.json" "${BASE_COMMIT:-}"
status=0
"$head" compare "$out/base-2.json" "$out/head-2.json" --summary "$summary" || status=$?
if [ "$status" = 1 ]; then
    echo "perf A/B: regression confirmed in two independent base/head measurements" | tee -a "$summary"
fi
exit "$status"
