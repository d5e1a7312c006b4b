"""Gateway overhead on run_code("x + 1"): the E2B SDK through forkd-gateway,
a raw HTTP client on the same /execute endpoint, and the native forkd Python
client on the daemon socket, interleaved in one process, one sandbox each.

    E2B_API_KEY=... E2B_API_URL=http://127.0.0.1:3000 E2B_SANDBOX_URL=http://127.0.0.1:3000 \\
    PYTHONPATH=clients/python/src FORKD_SOCKET=/run/forkd/forkd.sock \\
    python gateway/bench/run_code_overhead.py [ROUNDS]

Needs e2b-code-interpreter 2.11.5 and httpx in the running python.
Prints medians and p90s in milliseconds and the median differences.
"""

import os
import statistics
import sys
import time

import httpx
from e2b_code_interpreter import Sandbox
from forkd import Forkd

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 50
WARMUP = 5
URL = os.environ["E2B_SANDBOX_URL"]


def timed(f):
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


fk = Forkd(os.environ.get("FORKD_SOCKET"))
native = fk.session()
native.run_code("x = 41")
sb = Sandbox.create()
sb.run_code("x = 41")
raw = httpx.Client()
headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49999",
           "X-Access-Token": sb._envd_access_token}


def run_native():
    assert native.run_code("x + 1").text == "42"


def run_sdk():
    assert sb.run_code("x + 1").text == "42"


def run_raw():
    r = raw.post(URL + "/execute", json={"code": "x + 1"}, headers=headers)
    assert '"text":"42"' in r.text, r.text


series = {"native": [], "e2b_sdk": [], "raw_http": []}
fns = {"native": run_native, "e2b_sdk": run_sdk, "raw_http": run_raw}
for i in range(WARMUP + ROUNDS):
    for name, f in fns.items():
        ms = timed(f)
        if i >= WARMUP:
            series[name].append(ms)

for name, xs in series.items():
    print(f"{name:9s} n={len(xs)} median={statistics.median(xs):.3f} ms  p90={p(xs, 0.9):.3f} ms")
med = {k: statistics.median(v) for k, v in series.items()}
print(f"overhead e2b_sdk - native: {med['e2b_sdk'] - med['native']:.3f} ms (median)")
print(f"overhead raw_http - native: {med['raw_http'] - med['native']:.3f} ms (median)")
sb.kill()
native.kill()
