"""compare-all: forkd side by side with Docker, gVisor, OpenSandbox, bubblewrap and cold Python.

See compare/METHODOLOGY.md for what is timed and why it is fair.
"""

import argparse
import asyncio
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import backends as B
from . import setup

ALL = ["forkd", "forkd-nopool", "forkd-nopreload", "python", "bwrap", "docker", "gvisor", "opensandbox"]
NO_DOCKER = ["forkd", "forkd-nopool", "forkd-nopreload", "python", "bwrap"]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="compare-all", description=__doc__.splitlines()[0],
                                 epilog="Writes results.json, results.md and chart.png to --out. Exit status 1 "
                                        "when a backend could not run or any sandbox's output was not verified.")
    ap.add_argument("--quick", action="store_true", help="smoke test: N=1,10, 2 rounds each")
    ap.add_argument("--backends", default=",".join(ALL),
                    help=f"comma-separated subset of {','.join(ALL)} (default: all)")
    ap.add_argument("-n", "--sizes", default=None, help="concurrency levels (default 1,10,100; --quick 1,10)")
    ap.add_argument("--rounds", default=None,
                    help="rounds per size, e.g. 5,5,3 (default 5 for N<100, 3 for N>=100; --quick 2)")
    ap.add_argument("--python", default="/usr/bin/python3",
                    help="numpy-bearing interpreter for forkd's zygote, cold python and bwrap (default Debian's "
                         "/usr/bin/python3 with python3-numpy, the same Python and numpy as the Docker image)")
    ap.add_argument("--forkd-bin", default=None,
                    help="forkd daemon binary (default: target/release/forkd, built by cargo first)")
    ap.add_argument("--warm-pool", type=int, default=None, help="forkd warm pool size (default: largest N)")
    ap.add_argument("--opensandbox-grace", default="50ms",
                    help="EXECD_API_GRACE_SHUTDOWN given to OpenSandbox sandboxes (execd's default is 1s)")
    ap.add_argument("--out", default=None, help="results folder (default compare/results; --quick: compare/results/tmp)")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: rewrite results.md and chart.png from --out's results.json")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG (needs matplotlib, installed by apt)")
    a = ap.parse_args(argv)
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = set(a.backends) - set(ALL)
    if unknown:
        ap.error(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL)}")
    a.sizes = [int(x) for x in (a.sizes or ("1,10" if a.quick else "1,10,100")).split(",")]
    if a.rounds:
        r = [int(x) for x in a.rounds.split(",")]
        a.rounds = (r + [r[-1]] * len(a.sizes))[: len(a.sizes)]
    else:
        a.rounds = [2 if a.quick else (5 if n < 100 else 3) for n in a.sizes]
    a.out = Path(a.out) if a.out else setup.REPO / "compare" / "results" / ("tmp" if a.quick else "")
    a.warm_pool = a.warm_pool if a.warm_pool is not None else max(a.sizes)
    return a


def make_backend(name, a):
    py, fb = a.python, a.forkd_bin
    return {
        "forkd": lambda: B.Forkd("forkd", py, fb, ["numpy"], a.warm_pool),
        "forkd-nopool": lambda: B.Forkd("forkd-nopool", py, fb, ["numpy"], 0),
        "forkd-nopreload": lambda: B.Forkd("forkd-nopreload", py, fb, [], a.warm_pool),
        "python": lambda: B.ColdPython(py),
        "bwrap": lambda: B.Bubblewrap(py),
        "docker": lambda: B.Docker("runc"),
        "gvisor": lambda: B.Docker("runsc"),
        "opensandbox": lambda: B.OpenSandbox(a.opensandbox_grace),
    }[name]()


def percentile(values, q):
    """Nearest-rank percentile (no interpolation: every figure is a measured value)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def summarize(rounds, n):
    walls, lat, ok, total, tear, errors = [], [], 0, 0, [], []
    for r in rounds:
        if "error" in r:
            errors.append(r["error"])
            total += n
            continue
        good = [s for s in r["samples"] if s["ok"]]
        ok += len(good)
        total += len(r["samples"])
        # Wall: first request -> last verified result; a round with any failure still reports it,
        # the success count says how many results it covers.
        walls.append(max(s["end"] for s in good) if good else None)
        lat += [s["end"] - s["start"] for s in good]
        if r.get("teardown_s") is not None:
            tear.append(r["teardown_s"])
        errors += [s["detail"] for s in r["samples"] if not s["ok"]]
        if r.get("teardown_error"):
            errors.append("teardown: " + r["teardown_error"])
    w = [x for x in walls if x is not None]
    return {
        "n": n, "rounds": len(rounds), "success": ok, "requested": total,
        "wall_s": {"median": statistics.median(w) if w else None, "min": min(w) if w else None,
                   "max": max(w) if w else None, "each": walls},
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "samples": sorted(lat)},
        "teardown_s": statistics.median(tear) if tear else None,
        "errors": sorted(set(errors))[:5], "error_count": len(errors),
    }


def fmt_s(x):
    if x is None:
        return "—"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def summary_table(res):
    """One row per backend: wall at every N, then the largest N in detail."""
    sizes = res["sizes"]
    big = max(sizes)
    head = " | ".join(f"N={n} wall" for n in sizes[:-1])
    lines = [f"| backend | {head} | N={big} wall (min–max) | verified | per-sandbox p50 / p99 | teardown |",
             "|---|" + "---|" * (len(sizes) + 3)]
    for b in res["backends"]:
        if b["status"] != "ok":
            lines.append(f"| {b['name']} | " + " | ".join(["could not run"] + ["—"] * (len(sizes) + 3)) + " |")
            continue
        by_n = {s["n"]: s for s in b["results"]}
        cells = [fmt_s(by_n[n]["wall_s"]["median"]) if n in by_n else "—" for n in sizes[:-1]]
        s = by_n.get(big)
        if s:
            w = s["wall_s"]
            cells += [f"{fmt_s(w['median'])} ({fmt_s(w['min'])}–{fmt_s(w['max'])})", f"{s['success']}/{s['requested']}",
                      f"{fmt_s(s['latency_s']['p50'])} / {fmt_s(s['latency_s']['p99'])}", fmt_s(s["teardown_s"])]
        else:
            cells += ["—"] * 4
        lines.append(f"| {b['name']} | " + " | ".join(cells) + " |")
    return lines


def markdown(res):
    h = res["host"]
    lines = [f"# compare-all results ({res['mode']} run, {res['finished']})", "",
             "Workload: N sandboxes requested at once, each runs "
             f"`{B.SNIPPET}` and must print `{B.EXPECTED}`. Wall = first request → last verified result "
             f"(median of the rounds, min–max in brackets); per-sandbox latency = its request → its verified "
             f"result, pooled over rounds; teardown is timed separately. See compare/METHODOLOGY.md.", "",
             *summary_table(res), "", "All sizes:", "",
             "| backend | N | wall median (min–max) | verified | per-sandbox p50 / p99 | teardown (median) |",
             "|---|---|---|---|---|---|"]
    for b in res["backends"]:
        if b["status"] != "ok":
            lines.append(f"| {b['name']} | — | **could not run** | — | — | — |")
            continue
        for s in b["results"]:
            w = s["wall_s"]
            rng = f" ({fmt_s(w['min'])}–{fmt_s(w['max'])})" if s["rounds"] > 1 and w["min"] is not None else ""
            lines.append(f"| {b['name']} | {s['n']} | {fmt_s(w['median'])}{rng} | {s['success']}/{s['requested']} "
                         f"| {fmt_s(s['latency_s']['p50'])} / {fmt_s(s['latency_s']['p99'])} "
                         f"| {fmt_s(s['teardown_s'])} |")
    lines += ["", "Backends:", ""]
    for b in res["backends"]:
        lines.append(f"- **{b['name']}**: {b['description']}. Teardown: {b['teardown_note']}.")
        if b["status"] != "ok":
            lines.append(f"  - could not run: `{b['error'][:1000]}`")
        for s in b.get("results", []):
            if s["errors"]:
                lines.append(f"  - N={s['n']}: {s['error_count']} failure(s), e.g. `{s['errors'][0][:400]}`")
            notes = sorted({r.get("note") for r in s.get("notes", []) if r})
            if notes:
                lines.append(f"  - N={s['n']}: " + "; ".join(notes))
    lines += ["", f"Host: {h['cpus']} CPUs ({h['cpu_model']}), {h['memory_gib']} GiB, kernel {h['kernel']}, "
              f"{h['os']}, cgroup {h['cgroup']}; load average at start {', '.join(f'{x:.2f}' for x in h['loadavg_at_start'])}.",
              "", "Versions:", ""]
    for k, v in res["versions"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", f"Rounds per N: {res['rounds']}; rounds interleave the backends (round r of every backend, "
              "then round r+1) so that load on this shared machine falls on all of them alike; one untimed "
              "N=1 warm-up per backend first.", ""]
    return "\n".join(lines)


async def run_all(a, backends):
    for b in backends:  # warm-up: page cache, image layers, zygote first fork
        if b["status"] == "ok":
            try:
                await b["obj"].round(1)
            except Exception as e:
                b["status"], b["error"] = "failed", f"warm-up: {type(e).__name__}: {e}"
    for n, rounds in zip(a.sizes, a.rounds):
        for r in range(rounds):
            for b in backends:
                if b["status"] != "ok":
                    continue
                t = time.monotonic()
                try:
                    res = await b["obj"].round(n)
                except Exception as e:
                    res = {"error": f"{type(e).__name__}: {e}"[:2000], "samples": []}
                b["raw"].setdefault(n, []).append(res)
                ok = sum(1 for s in res.get("samples", []) if s["ok"])
                print(f"compare-all: {b['name']:<16} N={n:<4} round {r + 1}/{rounds}: {ok}/{n} verified "
                      f"({time.monotonic() - t:.1f} s)", flush=True)


def build_forkd(a):
    if a.forkd_bin:
        return
    a.forkd_bin = str(setup.REPO / "target" / "release" / "forkd")
    setup.log("cargo build --release -p forkd -p forkd-zygote")
    p = subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "forkd", "-p", "forkd-zygote"],
                       cwd=setup.REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise B.BackendUnavailable(f"cargo build failed: {p.stderr[-800:]}")


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.render:
        return render(a.out, json.loads((a.out / "results.json").read_text()), chart=not a.no_chart)
    # SIGTERM unwinds like Ctrl-C, so daemons, servers and containers started here are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if os.geteuid() != 0:
        sys.exit("compare-all: run as root (it installs packages, starts dockerd and forkd with cgroups)")
    started = datetime.datetime.now(datetime.timezone.utc)
    host = setup.host_facts()
    python_needs_apt = a.python == "/usr/bin/python3"
    backends, versions = [], {}
    forkd_err = None
    if any(n.startswith("forkd") for n in a.backends):
        try:
            build_forkd(a)
        except Exception as e:
            forkd_err = str(e)
    try:
        prepare_and_run(a, backends, versions, forkd_err, python_needs_apt)
    finally:
        for b in backends:
            if "obj" in b:
                try:
                    b["obj"].close()
                except Exception as e:
                    setup.log(f"closing {b['name']}: {e}")
    return report(a, started, host, versions, backends)


def prepare_and_run(a, backends, versions, forkd_err, python_needs_apt):
    for name in a.backends:
        entry = {"name": name, "status": "ok", "raw": {}}
        backends.append(entry)  # before prepare: whatever it starts is closed even on Ctrl-C
        try:
            if python_needs_apt and name in NO_DOCKER:
                setup.apt_install(["python3-numpy"])
            obj = make_backend(name, a)
            entry.update(obj=obj, description=obj.description, teardown_note=obj.teardown_note)
            if name.startswith("forkd") and forkd_err:
                raise B.BackendUnavailable(forkd_err)
            setup.log(f"preparing {name}")
            obj.prepare()
            for k, v in obj.versions().items():
                versions.setdefault(k, v)
        except Exception as e:
            entry.setdefault("description", name)
            entry.setdefault("teardown_note", "—")
            entry["status"], entry["error"] = "unavailable", f"{type(e).__name__}: {e}"
            setup.log(f"{name} cannot run: {entry['error'][:500]}")
            if not isinstance(e, (B.BackendUnavailable, setup.SetupError)):
                traceback.print_exc()
    asyncio.run(run_all(a, backends))


def report(a, started, host, versions, backends):
    for b in backends:
        b["results"] = []
        for n in a.sizes:
            if n in b["raw"]:
                s = summarize(b["raw"][n], n)
                s["notes"] = [{"note": r.get("note")} for r in b["raw"][n] if r.get("note")]
                b["results"].append(s)
    res = {
        "mode": "quick" if a.quick else "full", "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": {"code": B.SNIPPET, "expected": B.EXPECTED, "thread_env": B.THREAD_ENV},
        "sizes": a.sizes, "rounds": dict(zip(map(str, a.sizes), a.rounds)), "host": host, "versions": versions,
        "backends": [{k: v for k, v in b.items() if k not in ("obj", "raw")} for b in backends],
        "raw": {b["name"]: {str(n): r for n, r in b["raw"].items()} for b in backends},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    # One line per top-level key: diffable without spreading thousands of samples over lines.
    (a.out / "results.json").write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}"
                                                            for k, v in res.items()) + "\n}\n")
    return render(a.out, res, chart=not a.no_chart)


def render(out, res, chart=True):
    """Writes results.md (and chart.png) from `res`; the exit status the results deserve."""
    md = markdown(res)
    if chart:
        try:
            setup.apt_install(["python3-matplotlib"])
            p = subprocess.run(["/usr/bin/python3", str(Path(__file__).with_name("chart.py")),
                                str(out / "results.json"), str(out / "chart.png")],
                               capture_output=True, text=True, timeout=300)
            if p.returncode != 0:
                raise setup.SetupError(p.stderr[-600:])
            md += "\n![wall time and latency distribution](chart.png)\n"
        except Exception as e:
            md += f"\nChart not made: {e}\n"
            setup.log(f"chart not made: {e}")
    (out / "results.md").write_text(md)
    print(md)
    setup.log(f"results in {out}")
    bad = [b["name"] for b in res["backends"] if b["status"] != "ok"
           or any(s["success"] != s["requested"] for s in b["results"])]
    if bad:
        setup.log(f"NOT all verified: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
