"""Branch, checkpoint and restore of an overlay-workspace session against a
plain one, through the Python client (docs/branch.md, "Workspaces").

    python3 workspace/bench/branch_time.py target/release/forkd .venv/bin/python N

Starts the daemon (root) on a temporary socket with a workspace root holding
a 200-file tree; each session holds numpy and a 50 MB array, and the
workspace session has written 100 files (1 MB) into `out/`. Per round:
branch(1) until the branch answers `x + 1`, then checkpoint, restore.
"""
import os, shutil, statistics, subprocess, sys, tempfile, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python", "src"))
import forkd  # noqa: E402
bin_, py, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tmp = tempfile.mkdtemp(prefix="wsb-bench-")
root = os.path.join(tmp, "ws", "repo")
os.makedirs(os.path.join(root, "out"))
for i in range(200):
    os.makedirs(os.path.join(root, "src", f"d{i % 20}"), exist_ok=True)
    open(os.path.join(root, "src", f"d{i % 20}", f"f{i}.py"), "w").write("x" * 1000)
cfg = os.path.join(tmp, "forkd.toml")
open(cfg, "w").write(f'workspace_roots = ["{tmp}/ws"]\n')
sock = os.path.join(tmp, "forkd.sock")
log = open(os.path.join(tmp, "log"), "wb")
p = subprocess.Popen([bin_, "--python", py, "--preload", "numpy", "--socket", sock, "--config", cfg], stdout=log, stderr=subprocess.STDOUT)
try:
    for _ in range(600):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    time.sleep(1)
    fk = forkd.Forkd(sock, timeout=120)
    setup = "import numpy as np\na = np.ones(50 * 2**20 // 8)\nx = 41\n"
    ws_setup = setup + "import os\nfor i in range(100): open(f'/workspace/out/f{i}', 'w').write('y' * 10000)\n"
    def run(label, ws):
        s = fk.session(workspace=ws) if ws else fk.session()
        r = s.run_code(ws_setup if ws else setup)
        assert r.error is None, r.error
        br, ck, rs = [], [], []
        for _ in range(n):
            t = time.perf_counter()
            [b] = s.branch()
            assert b.run_code("x + 1").text == "42"
            br.append((time.perf_counter() - t) * 1e3)
            b.kill()
            t = time.perf_counter(); c = s.checkpoint(); ck.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter(); s.restore(c); rs.append((time.perf_counter() - t) * 1e3)
            s.delete_checkpoint(c)
        s.kill()
        f = lambda v: f"median {statistics.median(v):.1f} ms (min {min(v):.1f}, max {max(v):.1f})"
        print(f"{label}: branch+first cell {f(br)}; checkpoint {f(ck)}; restore {f(rs)}; n={n}")
    for _ in range(2):
        run("plain session (spares after the first)", None)
        run("overlay workspace, 100-file 1 MB delta, 200-file tree", forkd.Workspace(path=root, rules=["out=write", "src/d0=none"], overlay=True))
finally:
    p.terminate(); p.wait()
    shutil.rmtree(tmp, ignore_errors=True)
