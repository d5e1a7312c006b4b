"""An agent's "python" tool: each model-written snippet runs in a fresh
sandbox; the observation fed back is stdout, or the error and stderr tail.

    FORKD_SOCKET=/path/to/forkd.sock python examples/agent_tool_loop.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from forkd import Execution, Forkd  # noqa: E402


def observation(r: Execution) -> str:
    """What the model sees after a tool call."""
    if r.ok:
        return r.text or "(no output)"
    why = f"killed ({r.killed_by})" if r.killed_by else f"exit code {r.exit_code}"
    tail = r.stderr.decode("utf-8", "replace")[-500:]
    return f"{why}\n{r.text}{tail}"


# Stand-ins for what a model would produce turn by turn.
TURNS = [
    "import numpy as np\nprint(np.linalg.eigvalsh([[2.0, 1.0], [1.0, 2.0]]).tolist())",
    "print(undefined_name)",
    "while True: pass",
    "import json, sys\nprint(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read()}))",
]


def main() -> int:
    with Forkd() as fk:
        print("daemon", fk.ping())
        for i, code in enumerate(TURNS, 1):
            r = fk.run(code, timeout=2, memory="256M", argv=["--turn", str(i)], stdin=b"context")
            print(f"--- turn {i} ({r.timings.total_us / 1000:.1f} ms) ---")
            print(observation(r).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
