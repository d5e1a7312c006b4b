#!/usr/bin/env bash
# Fuzzes frame decoding and request parsing + validation (fuzz/, cargo-fuzz)
# for a bounded time per target and fails on any crash, leak or timeout.
#   scripts/fuzz.sh            # CI: 40 s per target
#   FUZZ_SECS=600 scripts/fuzz.sh
# Installs what it needs (nightly toolchain, cargo-fuzz) if missing. New
# corpus entries go to fuzz/target/work/<target> (not committed); the
# committed seeds are fuzz/seeds/<target>. A crashing input is saved under
# fuzz/artifacts/<target>/ and the command to reproduce it is printed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FUZZ_SECS:-40}"
targets=(frame request)

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build -O
status=0
for t in "${targets[@]}"; do
    mkdir -p "target/work/$t"
    dict=()
    [ -f "$t.dict" ] && dict=("-dict=$t.dict")
    log="target/work/$t.log"
    # -timeout: one input taking longer than 10 s counts as a hang (failure).
    if cargo +nightly fuzz run -O "$t" "target/work/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 "${dict[@]}" \
        >"$log" 2>&1; then
        runs=$(awk '/stat::number_of_executed_units/ { print $NF }' "$log")
        echo "fuzz $t: ok, ${runs:-?} executions in ${secs} s"
    else
        status=1
        tail -n 60 "$log" >&2
        echo "fuzz $t: FAILED (full log: fuzz/$log; the crashing input is in fuzz/artifacts/$t/)" >&2
    fi
done
exit "$status"
