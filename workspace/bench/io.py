"""Workspace I/O, timed where it runs: on the host (`python io.py DIR`) or in a
sandbox (`forkd-run --workspace DIR --rule out=write ... io.py /workspace`).
Reads and stats every small file, reads one large file, writes and removes
small and large files under `out/` (a `write` area inside). Prints a JSON
object of medians over PASSES passes, in ms. `io_compare.py` drives it."""
import json, os, sys, time
root = sys.argv[1] if len(sys.argv) > 1 else "/workspace"
passes = int(sys.argv[2]) if len(sys.argv) > 2 else 7
out = os.path.join(root, "out")
def small_read():
    n = 0
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith((".py", ".txt")):
                with open(os.path.join(d, f), "rb") as h:
                    n += len(h.read())
    return n
def stat():
    return sum(1 for d, _, fs in os.walk(root) for f in fs if os.stat(os.path.join(d, f)))
def large_read():
    with open(os.path.join(root, "large.bin"), "rb") as h:
        while h.read(1 << 20):
            pass
block = b"x" * 4096
def small_write():
    names = [os.path.join(out, f"w{i}.txt") for i in range(1000)]
    for p in names:
        with open(p, "wb") as h:
            h.write(block)
    for p in names:
        os.unlink(p)
chunk = b"y" * (1 << 20)
def large_write():
    p = os.path.join(out, "large.tmp")
    with open(p, "wb") as h:
        for _ in range(64):
            h.write(chunk)
    os.unlink(p)
ops = [("small_read_10k", small_read), ("stat_10k", stat), ("large_read_64M", large_read),
       ("small_write_1k", small_write), ("large_write_64M", large_write)]
if len(sys.argv) > 3:  # `io.py DIR 0 OP SECONDS`: repeat one operation (for profiling)
    import ctypes  # the profile is filtered by this process name (PR_SET_NAME)
    ctypes.CDLL(None).prctl(15, b"forkd-io-bench", 0, 0, 0)
    f = dict(ops)[sys.argv[3]]
    end = time.monotonic() + float(sys.argv[4])
    while time.monotonic() < end:
        f()
    sys.exit(0)
res = {}
for name, f in ops:
    f()  # one warm-up pass: the page cache state is then the same on both sides
    ts = []
    for _ in range(passes):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); res[name] = round(ts[len(ts) // 2] * 1000, 3)
print(json.dumps(res))
