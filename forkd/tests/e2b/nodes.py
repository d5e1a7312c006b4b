"""Two forkd gateways, each with its own daemon, as two nodes: a sandbox made
through node A is driven through node B, which forwards to A.

Run by forkd/tests/e2b.rs (two_gateways_forward_to_the_node_that_holds_the_sandbox)
with FORKD_URL_A, FORKD_URL_B (node names node-a and node-b, peers of each
other; B also knows node-c, whose address nothing listens on) and
E2B_API_KEY. Prints one line per check and "ALL OK" at the end.
"""

import os
import time

import httpx
from e2b import CommandExitException, SandboxException
from e2b_code_interpreter import Sandbox

A = os.environ["FORKD_URL_A"]
B = os.environ["FORKD_URL_B"]
KEY = os.environ["E2B_API_KEY"]


def check(name, cond, detail=""):
    assert cond, f"{name}: {detail}"
    print("ok", name, flush=True)


sb = Sandbox.create(api_url=A, sandbox_url=A)
check("the id names node A", sb.sandbox_id.startswith("s-") and sb.sandbox_id.endswith("--node-a"), sb.sandbox_id)
sb.run_code("x = 41")

# Everything below goes to node B only.
via_b = Sandbox.connect(sb.sandbox_id, api_url=B, sandbox_url=B)
check("connect through B", via_b.sandbox_id == sb.sandbox_id, via_b.sandbox_id)
ex = via_b.run_code("x + 1")
check("run_code through B sees A's state", ex.text == "42", repr(ex))

seen = []
t0 = time.monotonic()
via_b.run_code(
    "import time\nprint('first', flush=True)\ntime.sleep(1.0)\nprint('second')",
    on_stdout=lambda m: seen.append((m.line, time.monotonic() - t0)),
)
check("a cell's output streams through B", [s for s, _ in seen] == ["first\n", "second\n"], repr(seen))
check("the first line came before the cell ended", seen[0][1] < seen[1][1] - 0.5, repr(seen))

via_b.files.write("/tmp/from-b.txt", "written through B")
check("a file written through B is in A's sandbox", sb.files.read("/tmp/from-b.txt") == "written through B")
check("read through B", via_b.files.read("/tmp/from-b.txt") == "written through B")
check("list through B", "from-b.txt" in [e.name for e in via_b.files.list("/tmp")])

out = []
t0 = time.monotonic()
r = via_b.commands.run("echo one; sleep 1; echo two", on_stdout=lambda l: out.append((l, time.monotonic() - t0)))
check("a command streams through B", r.exit_code == 0 and [l for l, _ in out] == ["one\n", "two\n"], repr((r, out)))
check("its first line came before it ended", out[0][1] < out[1][1] - 0.5, repr(out))
try:
    via_b.commands.run("echo bad >&2; exit 3")
    check("exit code through B", False, "no CommandExitException")
except CommandExitException as e:
    check("exit code through B", e.exit_code == 3 and "bad" in e.stderr, repr(e))

info = Sandbox.get_info(sb.sandbox_id, api_url=B)
check("info through B", info.sandbox_id == sb.sandbox_id and info.state.value == "running", repr(info))
check("B lists only its own node's sandboxes", sb.sandbox_id not in {s.sandbox_id for s in Sandbox.list(api_url=B).next_items()})
check("A lists it", sb.sandbox_id in {s.sandbox_id for s in Sandbox.list(api_url=A).next_items()})

# A checks the key of a forwarded request.
r = httpx.get(f"{B}/sandboxes/{sb.sandbox_id}", headers={"X-API-KEY": "not-a-key-0123456789"})
check("a wrong key through B is refused by A", r.status_code == 401 and r.json()["code"] == 401, r.text)
r = httpx.post(f"{B}/execute", json={"code": "1"}, headers={"E2b-Sandbox-Id": sb.sandbox_id, "X-Access-Token": "forged"})
check("a forged token through B is refused by A", r.status_code == 401, r.text)

# An id of a node nobody knows.
for req in [
    lambda: httpx.get(f"{B}/sandboxes/s-0123abcd--node-z", headers={"X-API-KEY": KEY}),
    lambda: httpx.post(f"{B}/execute", json={"code": "1"}, headers={"E2b-Sandbox-Id": "s-0123abcd--node-z", "X-API-KEY": KEY}),
]:
    r = req()
    m = r.json()
    check("unknown node: 502 in E2B's shape", r.status_code == 502 and m["code"] == 502 and "node-z" in m["message"] and "--peer" in m["message"], r.text)
try:
    Sandbox.get_info("s-0123abcd--node-z", api_url=B)
    check("the SDK raises for an unknown node", False, "no exception")
except SandboxException as e:
    check("the SDK raises for an unknown node", "node-z" in str(e), repr(e))

# A known node whose gateway is down: a clear 502, at once.
t0 = time.monotonic()
r = httpx.post(f"{B}/sandboxes/s-0123abcd--node-c/timeout", json={"timeout": 5}, headers={"X-API-KEY": KEY}, timeout=30)
took = time.monotonic() - t0
check("node down: 502 naming it", r.status_code == 502 and "node-c" in r.json()["message"] and "down" in r.json()["message"], r.text)
check("node down: no hang", took < 6, f"{took:.1f} s")
t0 = time.monotonic()
r = httpx.post(
    f"{B}/process.Process/Start",
    content=b"{}",
    headers={"E2b-Sandbox-Id": "s-0123abcd--node-c", "Content-Type": "application/connect+json", "X-API-KEY": KEY},
    timeout=30,
)
check("node down, envd call: 502", r.status_code == 502 and "node-c" in r.text and time.monotonic() - t0 < 6, r.text)

# A forwarded request is not forwarded again.
r = httpx.get(f"{B}/sandboxes/{sb.sandbox_id}", headers={"X-API-KEY": KEY, "forkd-forwarded-from": "node-x"})
check("no second hop", r.status_code == 508 and "node-x" in r.json()["message"], r.text)

check("kill through B", Sandbox.kill(sb.sandbox_id, api_url=B) is True)
check("gone from A", sb.sandbox_id not in {s.sandbox_id for s in Sandbox.list(api_url=A).next_items()})
check("kill again through B is False", Sandbox.kill(sb.sandbox_id, api_url=B) is False)

print("ALL OK", flush=True)
# No finalization (see sdk.py's last lines).
os._exit(0)
