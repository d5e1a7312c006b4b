#!/usr/bin/env bash
# CPython's regrtest, module by module, outside (plain `python -m test M`)
# and inside forkd (`forkd-run -m test M` against a private daemon whose
# zygote runs the same interpreter), then the modules whose verdict differs.
# The expected, isolation-caused differences are listed with their reasons
# in docs/fidelity.md; this script only measures.
#
#   scripts/regrtest-inside.sh                 # every test module (long: run it niced, in the background)
#   scripts/regrtest-inside.sh test_os test_re # only these
#   SIDE=outside|inside|both (default both); OUT=DIR keeps the logs (default a temp dir)
#   PYTHON (default .venv/bin/python), BIN (default target/debug), MODULE_TIMEOUT (s, default 300)
#
# Verdicts: pass, fail, env_changed, no_tests, skipped, timeout, other:RC.
#   scripts/regrtest-inside.sh --sample        # the bounded CI sample (scripts/test.sh)
# Exit status: 0 when no module passes outside and fails inside (apart from
# scripts/regrtest-expected.tsv, explained in docs/fidelity.md), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BIN=${BIN:-$ROOT/target/debug}
MODULE_TIMEOUT=${MODULE_TIMEOUT:-300}
SIDE=${SIDE:-both}
OUT=${OUT:-$(mktemp -d /tmp/regrtest-inside.XXXXXX)}
mkdir -p "$OUT/outside" "$OUT/inside"

if ! "$PYTHON" -c 'import test.libregrtest' 2>/dev/null; then
    echo "regrtest-inside: $PYTHON has no test package (Debian: apt-get install libpython3.11-testsuite)" >&2
    exit 2
fi

# --sample: the bounded CI run (scripts/test.sh), modules that pass on both
# sides in seconds and cover files, processes, signals, locale, pwd/grp,
# ctypes, sqlite, sockets via select: under 5 minutes for both sides.
SAMPLE=(test_json test_re test_shutil test_sqlite3 test_select test_datetime test_math
    test_glob test_locale test_fileio test_mmap test_stat test_pwd test_grp test_sys
    test_platform test_site test_cmd_line_script test_exceptions test_atexit test_ctypes
    test_hashlib test_getpass test_genericpath test_subprocess)
if [ "${1:-}" = --sample ]; then
    MODULES=("${SAMPLE[@]}")
elif [ $# -gt 0 ]; then
    MODULES=("$@")
else
    mapfile -t MODULES < <("$PYTHON" -m test --list-tests)
fi

verdict() { # LOG RC -> verdict of one regrtest run
    local log=$1 rc=$2
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo timeout; return; fi
    if grep -q '^Result: SUCCESS' "$log"; then
        if grep -q '^1 test skipped:' "$log"; then echo skipped; else echo pass; fi
        return
    fi
    if grep -q '^Result: NO TESTS RAN' "$log"; then echo no_tests; return; fi
    if grep -q '^Result: ENV CHANGED' "$log"; then echo env_changed; return; fi
    if grep -q '^Result: FAILURE' "$log"; then echo fail; return; fi
    echo "other:$rc"
}

DAEMON_PID=
cleanup() {
    if [ -n "$DAEMON_PID" ]; then kill "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null; fi
}
trap cleanup EXIT

if [ "$SIDE" != outside ]; then
    SOCK=$OUT/forkd.sock
    # Generous limits: the point is fidelity, not the limits. Tests that
    # need the network stay skipped on both sides (regrtest's default -u).
    cat >"$OUT/forkd.toml" <<EOF
socket = "$SOCK"
max_concurrent = 8
[[zygote]]
name = "default"
python = "$PYTHON"
preload = []
[limits.default]
timeout_ms = $(((MODULE_TIMEOUT + 30) * 1000))
memory_bytes = "4G"
cpus = 2
pids = 1024
output_bytes = "64M"
scratch_bytes = "2G"
open_files = 4096
file_size_bytes = "1G"
[limits.max]
timeout_ms = $(((MODULE_TIMEOUT + 30) * 1000))
scratch_bytes = "2G"
EOF
    "$BIN/forkd" -c "$OUT/forkd.toml" --log-level warn 2>"$OUT/daemon.log" &
    DAEMON_PID=$!
    for _ in $(seq 1 300); do [ -S "$SOCK" ] && break; sleep 0.1; done
    if [ ! -S "$SOCK" ]; then
        echo "regrtest-inside: the daemon did not start; see $OUT/daemon.log" >&2
        cat "$OUT/daemon.log" >&2
        exit 2
    fi
fi

# Until the sandbox's stdio are the interpreter's own non-seekable streams
# (issue 20, first item), regrtest's sys.stdout.reconfigure() fails inside
# with ESPIPE and every module would fail for that one reason. Then (and only
# then) re-open sys.std* from fds 0-2 before regrtest starts, say so, and
# count that as one difference.
INSIDE=(-m test)
SHIM='import io, os, sys
for n, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
    old = getattr(sys, n)
    raw = io.FileIO(fd, mode + "b", closefd=False)
    buf = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    new = io.TextIOWrapper(buf, encoding=old.encoding, errors=old.errors, line_buffering=old.line_buffering, write_through=(n == "stderr"))
    setattr(sys, n, new); setattr(sys, "__%s__" % n, new)
sys.argv[0] = "python -m test"
from test.libregrtest.main import main
main()'
if [ "$SIDE" != outside ]; then
    probe=$("$BIN/forkd-run" --socket "$SOCK" -c 'import sys; print(sys.stdout.seekable())' </dev/null 2>&1)
    if [ "$probe" != False ]; then
        echo "regrtest-inside: DIFFERENCE: inside, sys.stdout.seekable() is $probe (outside: False); regrtest's reconfigure() would fail every module, so sys.std* are re-opened from fds 0-2 first" >&2
        INSIDE=(-c "$SHIM")
    fi
fi

echo "regrtest-inside: ${#MODULES[@]} modules, logs in $OUT" >&2
: >"$OUT/results.tsv"
for m in "${MODULES[@]}"; do
    o=- i=-
    if [ "$SIDE" != inside ]; then
        d=$(mktemp -d)
        # The caller's environment stays out (a PYTHONUNBUFFERED=1 there fails
        # test_cmd_line), as it does for the sandbox.
        (cd "$d" && timeout -k 10 "$MODULE_TIMEOUT" env -i PATH="$PATH" HOME="$HOME" LANG="${LANG:-C.UTF-8}" TMPDIR=/tmp \
            "$PYTHON" -m test "$m" </dev/null >"$OUT/outside/$m.log" 2>&1)
        o=$(verdict "$OUT/outside/$m.log" $?)
        rm -rf "$d"
    fi
    if [ "$SIDE" != outside ]; then
        timeout -k 10 $((MODULE_TIMEOUT + 20)) "$BIN/forkd-run" --socket "$SOCK" --timeout "$MODULE_TIMEOUT" \
            "${INSIDE[@]}" "$m" </dev/null >"$OUT/inside/$m.log" 2>&1
        rc=$?
        # forkd-run's own timeout kill reads as the outer one.
        if grep -q '^forkd-run: sandbox killed: timed out' "$OUT/inside/$m.log"; then rc=124; fi
        i=$(verdict "$OUT/inside/$m.log" $rc)
    fi
    printf '%s\t%s\t%s\n' "$m" "$o" "$i" | tee -a "$OUT/results.tsv"
done

count() { awk -F'\t' -v c="$1" -v v="$2" '$c==v' "$OUT/results.tsv" | wc -l; }
echo "== summary (${#MODULES[@]} modules)"
echo "pass outside: $(count 2 pass)   pass inside: $(count 3 pass)"
echo "== modules whose verdict differs (module, outside, inside)"
awk -F'\t' '$2!=$3 && $2!="-" && $3!="-"' "$OUT/results.tsv"
# Differences docs/fidelity.md explains (isolation-caused, or open with an
# owner) are listed apart and do not fail the run.
EXPECTED=${EXPECTED:-scripts/regrtest-expected.tsv}
awk -F'\t' '$2=="pass" && $3!="pass" && $3!="-"' "$OUT/results.tsv" | cut -f1 | sort >"$OUT/worse.txt"
grep -v '^#' "$EXPECTED" | cut -f1 | sort >"$OUT/expected.txt"
echo "pass outside, not inside, documented in docs/fidelity.md: $(comm -12 "$OUT/worse.txt" "$OUT/expected.txt" | tr '\n' ' ')"
comm -23 "$OUT/worse.txt" "$OUT/expected.txt" >"$OUT/unexplained.txt"
worse=$(wc -l <"$OUT/unexplained.txt")
echo "pass outside, not inside, unexplained: $worse $(tr '\n' ' ' <"$OUT/unexplained.txt")"
[ "$worse" = 0 ]
