"""Draws chart.png from results.json: wall time per backend at the largest N (log scale, median
with min-max range) and the per-sandbox latency distribution (empirical CDF, log scale).

Run by Debian's /usr/bin/python3 with python3-matplotlib: `chart.py results.json chart.png`.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    res = json.load(open(src))
    n = max(res["sizes"])
    rows = []
    for b in res["backends"]:
        s = next((s for s in b.get("results", []) if s["n"] == n), None)
        if s and s["wall_s"]["median"] is not None:
            rows.append((b["name"], s))
    failed = [b["name"] for b in res["backends"] if b["status"] != "ok"]
    rows.sort(key=lambda r: r[1]["wall_s"]["median"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 3.2))
    names = [f"{name}  ({s['success']}/{s['requested']})" for name, s in rows]
    med = [s["wall_s"]["median"] for _, s in rows]
    lo = [m - s["wall_s"]["min"] for m, (_, s) in zip(med, rows)]
    hi = [s["wall_s"]["max"] - m for m, (_, s) in zip(med, rows)]
    colors = ["#d95f02" if name.startswith("forkd") else "#7570b3" for name, _ in rows]
    y = range(len(rows))
    ax1.barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
    ax1.set_yticks(list(y), names)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds, first request → last verified result (log)")
    title = f"N={n} concurrent sandboxes: wall time (median, min–max of {res['rounds'][str(n)]} rounds)"
    ax1.set_title(title, fontsize=10)
    lows = [s["wall_s"]["min"] for _, s in rows] or [0.1]
    highs = [s["wall_s"]["max"] for _, s in rows] or [1]
    ax1.set_xlim(min(lows) / 3, max(highs) * 4)  # log bars need an explicit origin
    for i, (m, top) in enumerate(zip(med, highs)):
        ax1.text(top * 1.1, i, f"{m * 1000:.0f} ms" if m < 1 else f"{m:.2f} s", va="center", fontsize=8)
    if failed:
        ax1.text(0.99, 0.01, "could not run: " + ", ".join(failed), transform=ax1.transAxes, ha="right",
                 fontsize=8, color="#b00")
    for name, s in rows:
        lat = s["latency_s"]["samples"]
        if lat:
            ax2.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], drawstyle="steps-post", label=name,
                     linewidth=1.5)
    ax2.set_xscale("log")
    ax2.set_xlabel("seconds, one sandbox's request → its verified result (log)")
    ax2.set_ylabel("fraction of sandboxes")
    ax2.set_title(f"N={n}: per-sandbox latency distribution (all rounds)", fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    h = res["host"]
    fig.suptitle(f"compare-all ({res['mode']}, {res['finished'][:10]}): {h['cpus']} CPUs, kernel {h['kernel']}, "
                 f"cgroup {h['cgroup'].split(' (')[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
