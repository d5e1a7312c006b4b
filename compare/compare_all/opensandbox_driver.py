"""One round of the workload through OpenSandbox's Python SDK, run by the venv that has it.

Drives OpenSandbox as its users do: `Sandbox.create(image)` (the SDK waits until execd answers
its health ping), `sandbox.commands.run(...)`, then `sandbox.kill()`. Prints one JSON object:
per-sandbox samples (request -> verified output), the round's wall clock and the teardown time
(all kills, concurrently), measured here with the same definitions as the other backends.

Usage: python opensandbox_driver.py SERVER_HOST:PORT IMAGE N GRACE
"""

import asyncio
import json
import sys
import time
from datetime import timedelta

from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig

SNIPPET = "import numpy; print(numpy.zeros(5).tolist())"
EXPECTED = "[0.0, 0.0, 0.0, 0.0, 0.0]"
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


async def one(server, image, grace, t0):
    start = time.perf_counter()
    sandbox = None
    try:
        sandbox = await Sandbox.create(
            image,
            env={**THREAD_ENV, "EXECD_API_GRACE_SHUTDOWN": grace},
            timeout=timedelta(minutes=10),
            ready_timeout=timedelta(seconds=300),
            connection_config=ConnectionConfig(domain=server, protocol="http",
                                               request_timeout=timedelta(seconds=300)),
        )
        execution = await sandbox.commands.run(f'python3 -c "{SNIPPET}"')
        out = "".join(m.text for m in execution.logs.stdout).strip()
        err = "".join(m.text for m in execution.logs.stderr).strip()
        end = time.perf_counter()
        ok = execution.exit_code == 0 and out == EXPECTED
        detail = "" if ok else f"exit {execution.exit_code}, stdout {out[:200]!r}, stderr {err[-300:]!r}"
        return sandbox, {"start": start - t0, "end": end - t0, "ok": ok, "detail": detail}
    except Exception as e:  # reported per sandbox, never dropped
        return sandbox, {"start": start - t0, "end": time.perf_counter() - t0, "ok": False,
                         "detail": f"{type(e).__name__}: {e}"[:600]}


async def kill(sandbox):
    try:
        await sandbox.kill()
    finally:
        await sandbox.close()


async def main():
    server, image, n, grace = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    t0 = time.perf_counter()
    pairs = await asyncio.gather(*(one(server, image, grace, t0) for _ in range(n)))
    t1 = time.perf_counter()
    sandboxes = [s for s, _ in pairs if s is not None]
    kill_errors = [repr(r) for r in await asyncio.gather(*(kill(s) for s in sandboxes), return_exceptions=True)
                   if isinstance(r, BaseException)]
    teardown = time.perf_counter() - t1
    print(json.dumps({"samples": [s for _, s in pairs], "teardown_s": teardown, "teardown_errors": kill_errors}))


if __name__ == "__main__":
    asyncio.run(main())
