"""Side-by-side workspace I/O: the same `io.py` on the host directory and in
sandboxes mounting it, interleaved round by round (the order rotates), so
load from elsewhere hits every variant alike. Prints per-operation medians
over rounds and each variant's median ratio to the host in the same round.

    sudo python3 workspace/bench/io_compare.py [ROUNDS]

Needs a release build (`cargo build --release`) and the venv at .venv; makes
a tree of 10,002 files in 201 directories plus a 64 MiB file under
/var/tmp/forkd-io-tree (kept between runs)."""
import json, os, statistics, subprocess, sys, tempfile

repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
py = os.path.join(repo, ".venv/bin/python")
run = os.path.join(repo, "target/release/forkd-run")
tree = "/var/tmp/forkd-io-tree"
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
io_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "io.py")

if not os.path.exists(os.path.join(tree, "large.bin")):
    for d in range(200):
        os.makedirs(os.path.join(tree, f"pkg{d}"), exist_ok=True)
        for f in range(50):
            with open(os.path.join(tree, f"pkg{d}", f"m{f}.py"), "w") as h:
                h.write(f"# module {d}/{f}\n" + "x = 1\n" * (f * 20))
    os.makedirs(os.path.join(tree, "out"), exist_ok=True)
    os.makedirs(os.path.join(tree, "secrets"), exist_ok=True)
    with open(os.path.join(tree, "secrets", "key.txt"), "w") as h:
        h.write("secret\n")
    with open(os.path.join(tree, "large.bin"), "wb") as h:
        h.write(os.urandom(64 << 20))
    os.chmod(os.path.join(tree, "out"), 0o777)

conf = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
conf.write(f'workspace_roots = ["{os.path.dirname(tree)}"]\n'
           '[limits.default]\nmemory_bytes = "2G"\ncpus = 2.0\ntimeout_ms = 600000\n')
conf.close()
rules30 = ["secrets=none", "out=write", "**/*.env=none", "**/*.key=none"] + \
          [f"pkg{d}=read" for d in range(0, 200, 8)]
variants = {
    "host": None,
    "direct": ["--workspace-mode", "direct", "--rule", "out=write"],
    "direct_30_rules": ["--workspace-mode", "direct"] + [a for r in rules30 for a in ("--rule", r)],
    "overlay": ["--workspace-mode", "overlay", "--rule", "out=write"],
}

def once(name):
    if variants[name] is None:
        cmd = [py, io_py, tree]
    else:
        cmd = [run, "--embedded", "--python", py, "--config", conf.name, "--workspace", tree,
               *variants[name], "--timeout", "600", io_py, "/workspace"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{name} failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])

names = list(variants)
results = {n: [] for n in names}
for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
        results[n].append(once(n))
    print(f"round {r + 1}/{rounds} done", file=sys.stderr)

ops = list(results["host"][0])
print(f"{'variant':<18}" + "".join(f"{o:>18}" for o in ops))
for n in names:
    med = [statistics.median(x[o] for x in results[n]) for o in ops]
    print(f"{n:<18}" + "".join(f"{m:>15.2f} ms" for m in med))
for n in names[1:]:
    ratios = [statistics.median(results[n][i][o] / results["host"][i][o] for i in range(rounds)) for o in ops]
    print(f"{n + ' / host':<18}" + "".join(f"{x:>17.3f}x" for x in ratios))
os.unlink(conf.name)
