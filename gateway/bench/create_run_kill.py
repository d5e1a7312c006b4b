"""N concurrent create + run_code + kill: the E2B SDK through forkd-gateway
against the native forkd Python client, alternating, wall time of each batch.

    E2B_API_KEY=... E2B_API_URL=http://HOST:PORT E2B_SANDBOX_URL=http://HOST:PORT \\
    PYTHONPATH=clients/python/src FORKD_SOCKET=... python gateway/bench/create_run_kill.py [N] [ROUNDS]
"""

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from e2b_code_interpreter import Sandbox
from forkd import Forkd

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
SOCKET = os.environ.get("FORKD_SOCKET")


def native(_):
    with Forkd(SOCKET) as fk:
        s = fk.session()
        try:
            assert s.run_code("x = 41\nx + 1").text == "42"
        finally:
            s.kill()


def sdk(_):
    sb = Sandbox.create()
    try:
        assert sb.run_code("x = 41\nx + 1").text == "42"
    finally:
        sb.kill()


def batch(f):
    t = time.perf_counter()
    with ThreadPoolExecutor(N) as ex:
        list(ex.map(f, range(N)))
    return time.perf_counter() - t


walls = {"native": [], "e2b_sdk": []}
batch(native)  # warm-up
batch(sdk)
for _ in range(ROUNDS):
    walls["native"].append(batch(native))
    walls["e2b_sdk"].append(batch(sdk))
for k, v in walls.items():
    print(f"{k:8s} N={N} wall median={statistics.median(v):.3f} s  runs={[round(x, 3) for x in v]}")
print(f"ratio e2b_sdk / native: {statistics.median(walls['e2b_sdk']) / statistics.median(walls['native']):.2f}")
