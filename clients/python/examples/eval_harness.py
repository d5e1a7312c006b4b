"""A tiny eval harness: candidate solutions run concurrently on one
multiplexed connection, each checked against its expected output.

    FORKD_SOCKET=/path/to/forkd.sock python examples/eval_harness.py
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from forkd import AsyncForkd  # noqa: E402

# (candidate program, expected stdout); some are wrong on purpose.
CASES = [(f"print(sum(range({n})))", f"{n * (n - 1) // 2}\n") for n in range(100)]
CASES += [
    ("import numpy; print(numpy.ones(3).sum())", "3.0\n"),
    ("print(1 / 0)", "inf\n"),
    ("import time; time.sleep(10)", "never\n"),
]


async def main() -> int:
    t0 = time.monotonic()
    async with AsyncForkd() as fk:
        results = await fk.map([c for c, _ in CASES], concurrency=32, timeout=2, memory="256M")
    passed = 0
    for (code, want), r in zip(CASES, results):
        if r.ok and r.text == want:
            passed += 1
        else:
            status = r.killed_by or f"exit {r.exit_code}"
            print(f"FAIL {code!r}: {status}, got {r.text!r}")
    print(f"{passed}/{len(CASES)} passed in {time.monotonic() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
