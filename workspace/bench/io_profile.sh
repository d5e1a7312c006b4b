#!/usr/bin/env bash
# Where a sandbox's workspace I/O time goes, by kernel profile: runs one
# operation of io.py in a loop inside a sandbox (and on the host) under
# `perf record -a`, and prints the share of that process's samples (it names
# itself forkd-io-bench) spent in landlock, seccomp, overlayfs and id-mapping
# code (the id-mapping helpers run on the host too: compare with the host run). Shares of one
# profile are not skewed by load from elsewhere the way wall-clock A/B
# figures are (docs/workspaces.md "Cost").
#
#   sudo workspace/bench/io_profile.sh OP SECONDS [forkd-run workspace args...]
#   e.g. workspace/bench/io_profile.sh small_read_10k 15 --rule out=write
# OP: small_read_10k stat_10k large_read_64M small_write_1k large_write_64M.
# With no forkd-run arguments it profiles the host run. Needs perf, a release
# build and the tree io_compare.py makes (/var/tmp/forkd-io-tree).
set -euo pipefail
cd "$(dirname "$0")/../.."
op=$1 secs=$2
shift 2
tree=/var/tmp/forkd-io-tree
data=$(mktemp /tmp/io-profile.XXXXXX)
conf=$(mktemp /tmp/io-profile-conf.XXXXXX.toml)
trap 'rm -f "$data" "$conf"' EXIT
printf 'workspace_roots = ["%s"]\n[limits.default]\nmemory_bytes = "2G"\ncpus = 2.0\ntimeout_ms = 600000\n' \
    "$(dirname "$tree")" >"$conf"
if [ $# -eq 0 ]; then
    .venv/bin/python workspace/bench/io.py "$tree" 0 "$op" "$((secs + 4))" &
else
    target/release/forkd-run --embedded --python .venv/bin/python --config "$conf" \
        --workspace "$tree" "$@" workspace/bench/io.py /workspace 0 "$op" "$((secs + 4))" &
fi
run=$!
sleep 2 # daemon start-up and the first pass stay out of the profile
perf record -a -g -o "$data" -- sleep "$secs" >/dev/null 2>&1
wait "$run"
perf report -i "$data" --comm forkd-io-bench --no-children --sort sym -g none 2>/dev/null |
    awk -v op="$op" '
        /^#/ || NF < 3 { next }
        { p = $1; sub("%", "", p); all += p }
        $3 ~ /landlock|^is_access_to_paths|^hook_(file|inode|path)|^collect_domain|^current_check/ { ll += p }
        $3 ~ /seccomp/ { sc += p }
        $3 ~ /^ovl_/ { ov += p }
        $3 ~ /idmap|^make_vfs|^from_vfs|^map_id/ { id += p }
        END {
            if (all == 0) { print "no forkd-io-bench samples: did the run start?"; exit 1 }
            printf "%s: the benchmark process had %.1f%% of all samples; of them landlock %.1f%%, seccomp %.1f%%, overlayfs %.1f%%, idmapping %.1f%%\n",
                op, all, 100 * ll / all, 100 * sc / all, 100 * ov / all, 100 * id / all
        }'
