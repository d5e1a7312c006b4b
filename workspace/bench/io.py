"""Reads and stats every file of a workspace, and one large file: run on the
host (`python io.py DIR`) and in a sandbox (`forkd-run --workspace DIR ... io.py`)
to compare; prints medians of 7 passes in ms."""
import os, sys, time
root = sys.argv[1] if len(sys.argv) > 1 else "/workspace"
def small():
    n = 0
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith((".py", ".txt")):
                with open(os.path.join(d, f), "rb") as h:
                    n += len(h.read())
    return n
def stat():
    return sum(1 for d, _, fs in os.walk(root) for f in fs if os.stat(os.path.join(d, f)))
def large():
    with open(os.path.join(root, "large.bin"), "rb") as h:
        while h.read(1 << 20):
            pass
res = {}
for name, f in [("small_read_10k", small), ("stat_10k", stat), ("large_read_64M", large)]:
    ts = []
    for _ in range(7):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); res[name] = round(ts[3] * 1000, 2)
print(res)
