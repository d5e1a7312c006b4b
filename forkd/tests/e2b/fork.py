"""E2B's fork() (forkd's branch), its snapshots (refused with what to use
instead) and forkd's checkpoint extension, with the unmodified E2B SDKs.

The gateway must run with --max-sessions-per-tenant 3 and
--max-checkpoints-per-tenant 2. Run by forkd/tests/e2b.rs with
E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set. Prints one line per check
and "ALL OK" at the end.
"""

import os

import httpx
from e2b import NotFoundException, RateLimitException, SandboxException, SandboxQuery
from e2b_code_interpreter import Sandbox

URL = os.environ["E2B_API_URL"]
KEY = os.environ["E2B_API_KEY"]
RUN = os.urandom(4).hex()


def check(name, cond, detail=""):
    assert cond, f"{name}: {detail}"
    print("ok", name)


sb = Sandbox.create(metadata={"suite": "fork", "who": RUN})
sb.run_code("x = 41\nopen('/tmp/f.txt', 'w').write('parent')")
sb.commands.run("mkdir -p /tmp/d && echo from-shell > /tmp/d/s.txt")

# fork(): state and scratch copied; the copies and the source diverge.
forks = sb.fork(count=2)
check("fork count", len(forks) == 2, repr(forks))
a, b = forks
check("forks are sandboxes", all(isinstance(f, Sandbox) for f in forks), repr(forks))
ids = {sb.sandbox_id, a.sandbox_id, b.sandbox_id}
check("forks have their own ids", len(ids) == 3, repr(ids))
check("fork has the interpreter state", a.run_code("x + 1").text == "42")
check("fork has the files", a.files.read("/tmp/f.txt") == "parent" and b.files.read("/tmp/d/s.txt") == "from-shell\n")
a.run_code("x = 100")
a.files.write("/tmp/f.txt", "fork a")
check("source unchanged by a fork", sb.run_code("x").text == "41" and sb.files.read("/tmp/f.txt") == "parent")
check("forks diverge from each other", b.run_code("x").text == "41" and b.files.read("/tmp/f.txt") == "parent")
sb.run_code("x = 7")
check("a fork unchanged by its source", a.run_code("x").text == "100")
info = a.get_info()
check("fork keeps the metadata", info.metadata == {"suite": "fork", "who": RUN}, repr(info.metadata))
listed = {s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"who": RUN})).next_items()}
check("forks are listed", listed == ids, repr(listed))
r = a.commands.run("echo $$; cat /tmp/d/s.txt")
check("fork runs commands", r.exit_code == 0 and "from-shell" in r.stdout, repr(r))

# The quota counts forks: 3 sandboxes held, a fourth is a per-fork 429.
over = sb.fork()
check("fork over the quota", len(over) == 1 and isinstance(over[0], RateLimitException), repr(over))
check("kill a fork", b.kill() is True)
# A fork of a fork works, and outlives its parent; a third level is refused,
# saying why.
aa = a.fork()[0]
check("fork of a fork", aa.run_code("x").text == "100")
check("kill the middle fork", a.kill() is True)
check("fork of a fork outlives its parent", aa.run_code("x + 1").text == "101")
try:
    aa.fork()
    raise AssertionError("a fork of a fork of a fork passed")
except SandboxException as err:
    check("third-level fork refused", "cannot be branched" in str(err), repr(err))
f2 = sb.fork(timeout=60)[0]
left = (f2.get_info().end_at - f2.get_info().started_at).total_seconds()
check("fork timeout", 50 < left < 70, repr(left))
check("fork after a kill", f2.run_code("x").text == "7")
f2.kill()

# Snapshots: refused, naming what forkd offers instead.
try:
    sb.create_snapshot()
    raise AssertionError("create_snapshot passed")
except SandboxException as err:
    check("create_snapshot refused with alternatives", "fork()" in str(err) and "checkpoints" in str(err), repr(err))
check("list_snapshots is empty", list(sb.list_snapshots().next_items()) == [])
check("delete_snapshot of none is False", Sandbox.delete_snapshot("snap-none") is False)

# forkd's checkpoint extension (plain HTTP, the same key).
h = {"X-API-KEY": KEY}
base = f"{URL}/sandboxes/{sb.sandbox_id}"
sb.run_code("y = 'saved'")
cp = httpx.post(f"{base}/checkpoints", headers=h, json={})
check("checkpoint taken", cp.status_code == 201 and cp.json()["sandboxID"] == sb.sandbox_id, cp.text)
cid = cp.json()["checkpointID"]
sb.run_code("y = 'changed'")
sb.files.write("/tmp/f.txt", "changed")
rs = httpx.post(f"{base}/restore", headers=h, json={"checkpointID": cid})
check("restore", rs.status_code == 200 and rs.json()["sandboxID"] == sb.sandbox_id, rs.text)
check("restored state", sb.run_code("y").text == "'saved'" and sb.files.read("/tmp/f.txt") == "parent")
lst = httpx.get(f"{base}/checkpoints", headers=h).json()
check("checkpoints listed", [c["checkpointID"] for c in lst] == [cid] and lst[0]["restores"] == 1, repr(lst))
ab = f"{URL}/sandboxes/{aa.sandbox_id}"
cp2 = httpx.post(f"{ab}/checkpoints", headers=h)
check("second checkpoint, of a fork, without a body", cp2.status_code == 201, cp2.text)
over = httpx.post(f"{base}/checkpoints", headers=h, json={})
check("tenant checkpoint quota", over.status_code == 429 and "max-checkpoints-per-tenant 2" in over.json()["message"], over.text)
bad = httpx.post(f"{base}/restore", headers=h, json={"checkpointID": "c-nope"})
check("restore of an unknown checkpoint", bad.status_code == 404, bad.text)
check("delete checkpoint", httpx.delete(f"{base}/checkpoints/{cid}", headers=h).status_code == 204)
check("deleted checkpoint gone", httpx.get(f"{base}/checkpoints", headers=h).json() == [])
other = httpx.post(f"{base}/checkpoints", headers={"X-API-KEY": os.environ["FORKD_E2B_KEY_B"]}, json={})
check("another tenant cannot checkpoint", other.status_code == 404, other.text)

# Killing the source leaves its forks running (forkd keeps what they need
# of it until the last one ends); a fork ends when it is killed.
check("kill source", sb.kill() is True)
check("a fork outlives its source", aa.run_code("x").text == "100")
check("kill the fork of a fork", aa.kill() is True)
try:
    Sandbox.connect(aa.sandbox_id)
    raise AssertionError("connect to a killed fork passed")
except (NotFoundException, SandboxException) as err:
    check("killed fork gone", "not found" in str(err).lower(), repr(err))
print("ALL OK", flush=True)
