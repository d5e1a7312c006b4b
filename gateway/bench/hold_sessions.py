"""Holds N sandboxes open at once through the gateway with the E2B SDK:
creates them from 16 threads, runs a cell in every one, lists them, then
kills them all. Prints the wall time of each phase and the machine's used
memory before and with the N open (from /proc/meminfo).

    E2B_API_KEY=... E2B_API_URL=... E2B_SANDBOX_URL=... python gateway/bench/hold_sessions.py [N]
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

from e2b_code_interpreter import Sandbox

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000


def used_mib():
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) // 1024


def phase(name, f, items):
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        out = list(ex.map(f, items))
    print(f"{name}: {time.perf_counter() - t:.2f} s")
    return out


before = used_mib()
boxes = phase(f"create {N}", lambda i: Sandbox.create(metadata={"hold": "1"}, timeout=600), range(N))
texts = phase(f"run_code in all {N}", lambda s: s.run_code(f"{len(s.sandbox_id)} + 1").text, boxes)
assert all(t == "27" for t in texts), set(texts)
held = used_mib()
from e2b import SandboxQuery  # noqa: E402

listed = Sandbox.list(query=SandboxQuery(metadata={"hold": "1"})).next_items()
print(f"listed: {len(listed)}")
assert len(listed) == N
print(f"memory used: {before} MiB before, {held} MiB with {N} open (+{(held - before) / N:.2f} MiB each)")
phase(f"kill {N}", lambda s: s.kill(), boxes)
