"""Drives forkd's E2B gateway with the unmodified E2B Python SDKs.

The gateway must run with a quota of 2 sessions per tenant
(--max-sessions-per-tenant 2) and a 2 s deadline for request heads.

Run by forkd/tests/e2b.rs with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY
(tenant A) set, and FORKD_E2B_KEY_B (tenant B). Every check asserts; the
script prints one line per check and "ALL OK" at the end. A check that
cannot run here prints "SKIP <what>: <why>".
"""

import json
import os
import time

import httpx
from e2b import CommandExitException, NotFoundException, RateLimitException, SandboxException
from e2b.exceptions import AuthenticationException
from e2b_code_interpreter import Sandbox

URL = os.environ["E2B_API_URL"]
KEY_A = os.environ["E2B_API_KEY"]
KEY_B = os.environ["FORKD_E2B_KEY_B"]
RUN = os.urandom(4).hex()  # metadata unique to this run


def check(name, cond, detail=""):
    assert cond, f"{name}: {detail}"
    print("ok", name)


sb = Sandbox.create(metadata={"suite": "e2b", "who": RUN}, envs={"GREETING": "hello"})
check("create", sb.sandbox_id.startswith("s-"), sb.sandbox_id)

# State kept between cells; the trailing expression is the main result.
sb.run_code("x = 41")
ex = sb.run_code("x + 1")
check("state kept across run_code", ex.text == "42", repr(ex))
check("main result flagged", ex.results[0].is_main_result, repr(ex.results))
check("execution count", ex.execution_count == 2, repr(ex.execution_count))

# Streaming: each line reaches on_stdout while the cell still runs.
seen = []
t0 = time.monotonic()
ex = sb.run_code(
    "import time, sys\nprint('first', flush=True)\ntime.sleep(1.0)\nprint('second')\nprint('oops', file=sys.stderr)",
    on_stdout=lambda m: seen.append((m.line, time.monotonic() - t0)),
    on_stderr=lambda m: seen.append(("ERR " + m.line, time.monotonic() - t0)),
)
lines = [s for s, _ in seen]
check("streamed stdout and stderr", lines == ["first\n", "second\n", "ERR oops\n"], repr(seen))
check("first line arrived before the cell ended", seen[0][1] < seen[1][1] - 0.5, repr(seen))
check("logs collected", ex.logs.stdout == ["first\n", "second\n"] and ex.logs.stderr == ["oops\n"], repr(ex.logs))

# The environment given at create.
ex = sb.run_code("import os; os.environ['GREETING']")
check("envs at create", ex.text == "'hello'", repr(ex))
ex = sb.run_code("import os; (os.environ['GREETING'], os.environ['PER_RUN'])", envs={"GREETING": "temp", "PER_RUN": "1"})
check("envs per run_code", ex.text == "('temp', '1')", repr(ex))
ex = sb.run_code("(os.environ['GREETING'], os.environ.get('PER_RUN'))")
check("per-run envs are restored", ex.text == "('hello', None)", repr(ex))

# Errors are objects with name, value and traceback.
errors = []
ex = sb.run_code("def f():\n    return 1 / 0\nf()", on_error=errors.append)
e = ex.error
check("error name", e is not None and e.name == "ZeroDivisionError", repr(e))
check("error value", e.value == "division by zero", repr(e.value))
check("error traceback", "return 1 / 0" in e.traceback, e.traceback)
check("on_error callback", errors and errors[0].name == "ZeroDivisionError", repr(errors))
check("state survives an error", sb.run_code("x").text == "41")

# Rich results.
ex = sb.run_code(
    "class H:\n    def _repr_html_(self): return '<b>hi</b>'\n    def __repr__(self): return 'H()'\nH()"
)
check("html result", ex.results[0].html == "<b>hi</b>" and ex.results[0].text == "H()", repr(ex.results))
ex = sb.run_code("display({'a': 1}); 2")
check("display then main", len(ex.results) == 2 and ex.results[-1].is_main_result, repr(ex.results))
has_mpl = sb.run_code("import importlib.util; importlib.util.find_spec('matplotlib') is not None").text == "True"
if has_mpl:
    ex = sb.run_code(
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    )
    pngs = [r.png for r in ex.results if r.png]
    check("matplotlib PNG result", pngs and pngs[0].startswith("iVBOR"), repr(ex))
else:
    print("SKIP matplotlib PNG: matplotlib is not importable by the sandbox's python")

# A client that gives up (SDK timeout) disconnects; that interrupts the cell
# and the sandbox keeps its state.
from e2b import TimeoutException  # noqa: E402

t0 = time.monotonic()
try:
    sb.run_code("import time\nfor _ in range(600): time.sleep(0.1)", timeout=1)
    raise AssertionError("no timeout")
except TimeoutException:
    pass
ex = sb.run_code("x")
check("disconnect interrupts the cell", ex.text == "41" and time.monotonic() - t0 < 15, repr(ex))

# Other languages are refused clearly.
try:
    sb.run_code("1", language="javascript")
    raise AssertionError("javascript accepted")
except SandboxException as err:
    check("non-python refused", "Python only" in str(err), str(err))

# Contexts: separate interpreters of the same sandbox.
ctx = sb.create_code_context()
sb.run_code("x = 'ctx'", context=ctx)
check("context keeps its own state", sb.run_code("x", context=ctx).text == "'ctx'")
check("default context untouched", sb.run_code("x").text == "41")
ids = [c.id for c in sb.list_code_contexts()]
check("contexts listed", ctx.id in ids, repr(ids))
sb.restart_code_context(ctx)
check("restarted context is fresh", sb.run_code("'x' in dir()", context=ctx).text == "False")
sb.remove_code_context(ctx)
check("context removed", ctx.id not in [c.id for c in sb.list_code_contexts()])

# Files.
info = sb.files.write("/tmp/data/a.txt", "hello file")
check("files.write", info.path == "/tmp/data/a.txt", repr(info))
check("files.read", sb.files.read("/tmp/data/a.txt") == "hello file")
blob = bytes(range(256)) * 4096
sb.files.write("/tmp/data/b.bin", blob)
check("binary round trip (1 MiB)", bytes(sb.files.read("/tmp/data/b.bin", format="bytes")) == blob)
names = sorted(f.name for f in sb.files.list("/tmp/data"))
check("files.list", names == ["a.txt", "b.bin"], repr(names))
check("python sees the written file", sb.run_code("open('/tmp/data/a.txt').read()").text == "'hello file'")
check("files.exists", sb.files.exists("/tmp/data/a.txt") and not sb.files.exists("/tmp/nope"))
check("make_dir", sb.files.make_dir("/tmp/data/sub") is True)
check("make_dir again is False", sb.files.make_dir("/tmp/data/sub") is False)
moved = sb.files.rename("/tmp/data/a.txt", "/tmp/data/sub/c.txt")
check("rename", moved.path == "/tmp/data/sub/c.txt", repr(moved))
st = sb.files.get_info("/tmp/data/sub/c.txt")
check("get_info", st.size == len("hello file") and st.type.value == "file", repr(st))
sb.files.remove("/tmp/data/sub")
check("remove", not sb.files.exists("/tmp/data/sub"))
try:
    sb.files.read("/tmp/missing.txt")
    raise AssertionError("missing file read")
except NotFoundException as err:
    check("missing file is NotFound", True, str(err))

# Watching a directory (polled by the gateway: differences between polls).
sb.files.make_dir("/tmp/w")
sb.files.write("/tmp/w/keep.txt", "1")
sb.files.write("/tmp/w/gone.txt", "1")
wh = sb.files.watch_dir("/tmp/w", recursive=True)
sb.files.write("/tmp/w/new.txt", "x")
sb.files.write("/tmp/w/keep.txt", "longer")
sb.files.remove("/tmp/w/gone.txt")
sb.files.write("/tmp/w/sub/deep.txt", "d")
evs = sorted((e.name, e.type.name) for e in wh.get_new_events())
check("watch_dir events", evs == [("gone.txt", "REMOVE"), ("keep.txt", "WRITE"), ("new.txt", "CREATE"),
                                  ("sub", "CREATE"), ("sub/deep.txt", "CREATE")], repr(evs))
check("watch_dir quiet", wh.get_new_events() == [])
wh.stop()

# Commands.
out = []
r = sb.commands.run("echo one; sleep 0.3; echo two; echo err >&2", on_stdout=out.append)
check("command output", r.exit_code == 0 and r.stdout == "one\ntwo\n" and r.stderr == "err\n", repr(r))
check("command streamed", "".join(out) == "one\ntwo\n", repr(out))
try:
    sb.commands.run("echo bad >&2; exit 3")
    raise AssertionError("exit 3 passed")
except CommandExitException as err:
    check("command exit code", err.exit_code == 3 and err.stderr == "bad\n", repr(err))
r = sb.commands.run("pwd; echo $FOO", cwd="/tmp/data", envs={"FOO": "bar"})
check("command cwd and envs", r.stdout == "/tmp/data\nbar\n", repr(r.stdout))
h = sb.commands.run("echo started; sleep 30", background=True)
procs = sb.commands.list()
check("background command listed", any(p.pid == h.pid for p in procs), repr(procs))
check("kill command", sb.commands.kill(h.pid) is True)
res = None
try:
    res = h.wait()
except CommandExitException as err:
    res = err
check("killed command ends", res.exit_code != 0, repr(res))
check("kill unknown pid is False", sb.commands.kill(999999) is False)
h = sb.commands.run("for i in 1 2 3 4; do echo n$i; sleep 0.4; done", background=True)
h.disconnect()
time.sleep(0.5)
r = sb.commands.connect(h.pid).wait()
check("connect to a running command", r.exit_code == 0 and "n4" in r.stdout and "n1" not in r.stdout, repr(r))

# Stdin: send_stdin (several chunks, one larger than a pipe holds), then
# close_stdin ends `cat`; stream_input delivers a client stream in order.
h = sb.commands.run("cat", background=True, stdin=True)
big = "0123456789abcdef" * 6000  # 96 KiB
sb.commands.send_stdin(h.pid, "first ")
h.send_stdin(big)
sb.commands.send_stdin(h.pid, b" last")
sb.commands.close_stdin(h.pid)
r = h.wait()
check("send_stdin and close_stdin", r.exit_code == 0 and r.stdout == "first " + big + " last", repr(r.stdout[:80]))
try:
    sb.commands.send_stdin(h.pid, "late")
    raise AssertionError("input to an ended command passed")
except NotFoundException as err:
    check("send_stdin to an ended command is not found", "no" in str(err), repr(err))
# stream_input passes each chunk on as it arrives: the second is sent only
# once the first has reached the command (a gateway that waited for the
# whole stream would never let it).
h = sb.commands.run("cat > /tmp/in.txt", background=True, stdin=True)


def on_disk():
    # A connection of its own: the SDK's pooled ones may be idle past the
    # gateway's 2 s head deadline here, which the server closes (a reuse
    # racing that close is reset, as with any HTTP/1.1 keep-alive).
    r = httpx.get(URL + "/files", params={"path": "/tmp/in.txt"},
                  headers={"E2b-Sandbox-Id": sb.sandbox_id, "X-Access-Token": sb._envd_access_token})
    return r.text if r.status_code == 200 else None


def chunks():
    yield "a\n"
    for _ in range(200):
        if on_disk() == "a\n":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the first chunk did not reach the command while the stream was open")
    yield b"b\n"


sb.commands.stream_input(h.pid, chunks())
sb.commands.close_stdin(h.pid)
r = h.wait()
check("stream_input streams", r.exit_code == 0 and sb.files.read("/tmp/in.txt") == "a\nb\n", repr(r))
h = sb.commands.run("cat; sleep 30", background=True)
try:
    sb.commands.send_stdin(h.pid, "x")
    raise AssertionError("input to a command without stdin passed")
except SandboxException as err:
    check("send_stdin without stdin=True is refused", "stdin" in str(err), repr(err))
sb.commands.kill(h.pid)

# Timeout and info.
sb.set_timeout(120)
inf = sb.get_info()
left = (inf.end_at - inf.started_at).total_seconds()
check("set_timeout", 100 < left < 200, repr(inf))
check("metadata in info", inf.metadata == {"suite": "e2b", "who": RUN}, repr(inf.metadata))

m = sb.get_metrics()
check("metrics", len(m) == 1 and m[0].mem_used > 0 and m[0].mem_total >= m[0].mem_used, repr(m))

# Pause and resume (connect resumes).
sb.pause()
check("paused", Sandbox.get_info(sb.sandbox_id).state.value == "paused")
sb2 = Sandbox.connect(sb.sandbox_id)
check("connect resumes", Sandbox.get_info(sb.sandbox_id).state.value == "running")
check("state kept across pause", sb2.run_code("x").text == "41")

# Listing with a metadata filter.
from e2b import SandboxQuery  # noqa: E402

other = Sandbox.create(metadata={"suite": "e2b", "who": RUN + "-2"})
found = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"who": RUN})).next_items()]
check("list with metadata filter", found == [sb.sandbox_id], repr(found))
both = {s.sandbox_id for s in Sandbox.list().next_items()}
check("list", {sb.sandbox_id, other.sandbox_id} <= both, repr(both))

# Tenants: B sees none of A's sandboxes and cannot touch them.
b_list = [s.sandbox_id for s in Sandbox.list(api_key=KEY_B).next_items()]
check("tenant B lists nothing of A's", sb.sandbox_id not in b_list and other.sandbox_id not in b_list, repr(b_list))
try:
    Sandbox.get_info(sb.sandbox_id, api_key=KEY_B)
    raise AssertionError("B read A's info")
except NotFoundException:
    check("tenant B cannot read A's info", True)
check("tenant B cannot kill A's sandbox", Sandbox.kill(sb.sandbox_id, api_key=KEY_B) is False)
try:
    Sandbox.connect(sb.sandbox_id, api_key=KEY_B)
    raise AssertionError("B connected to A's sandbox")
except NotFoundException:
    check("tenant B cannot connect to A's sandbox", True)
sb_b = Sandbox.create(api_key=KEY_B)
check("tenant B works", sb_b.run_code("6 * 7").text == "42")
# The gateway runs with a quota of 2 sessions per tenant: B's third is
# refused with 429, and A (holding 2) is not affected by B's.
sb_b2 = Sandbox.create(api_key=KEY_B)
try:
    Sandbox.create(api_key=KEY_B)
    raise AssertionError("quota not enforced")
except RateLimitException as err:
    check("per-tenant quota", "maximum" in str(err), str(err))
sb_b2.kill()
# B's token does not open A's sandbox.
r = httpx.post(
    URL + "/execute",
    headers={"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49999",
             "X-Access-Token": sb_b._envd_access_token},
    json={"code": "x"},
)
check("B's token refused on A's sandbox", r.status_code == 401, r.text)
r = httpx.post(
    URL + "/execute",
    headers={"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49999", "X-API-KEY": KEY_B},
    json={"code": "x"},
)
check("B's key refused on A's sandbox", r.status_code == 404, r.text)
check("A still runs", sb.run_code("x").text == "41")
sb_b.kill()

# Wrong key.
try:
    Sandbox.create(api_key="not-a-key-not-a-key")
    raise AssertionError("wrong key accepted")
except AuthenticationException as err:
    check("wrong key refused", "401" in str(err), str(err))
r = httpx.get(URL + "/v2/sandboxes")
check("missing key is 401 in E2B's shape", r.status_code == 401 and r.json()["code"] == 401, r.text)

# Bad input: clear 4xx, nothing else disturbed.
h_a = {"X-API-KEY": KEY_A, "Content-Type": "application/json"}
r = httpx.post(URL + "/v2/sandboxes", headers=h_a, content=b"{not json")
check("malformed JSON is 400", r.status_code == 400 and "message" in r.json(), r.text)
r = httpx.post(URL + "/v2/sandboxes", headers=h_a, content=json.dumps({"templateID": 5}))
check("wrong JSON type is 400", r.status_code == 400, r.text)
big = b'{"templateID": "' + b"a" * (2 << 20) + b'"}'
r = httpx.post(URL + "/v2/sandboxes", headers=h_a, content=big)
check("oversized body is 413", r.status_code == 413, str(r.status_code))
r = httpx.get(URL + "/sandboxes/s-000000000000000000000000", headers=h_a)
check("unknown sandbox is 404", r.status_code == 404 and "not found" in r.json()["message"], r.text)
r = httpx.post(URL + "/execute", headers={"E2b-Sandbox-Id": "s-000000000000000000000000",
                                          "X-Access-Token": "00" * 32}, json={"code": "1"})
check("unknown sandbox token is 401", r.status_code == 401, r.text)
tok = {"E2b-Sandbox-Id": sb.sandbox_id, "X-Access-Token": sb._envd_access_token}
r = httpx.post(URL + "/process.Process/List", headers={**tok, "Content-Type": "application/json"}, content=b"[")
check("malformed Connect JSON is invalid_argument", r.status_code == 400 and r.json()["code"] == "invalid_argument", r.text)
r = httpx.post(URL + "/process.Process/List", headers={**tok, "Content-Type": "text/plain"}, content=b"{}")
check("wrong content type is refused", r.status_code == 400, r.text)
r = httpx.post(URL + "/process.Process/Start", headers={**tok, "Content-Type": "application/connect+json"}, content=b"\x00\x00\x00\x00\x09{}")
check("bad envelope ends the stream with an error", b"invalid_argument" in r.content, repr(r.content))
r = httpx.get(URL + "/health", headers={**tok, "E2b-Sandbox-Port": "8080"})
check("other ports are closed", r.status_code == 502 and "no public ports" in r.json()["message"], r.text)
# Slowloris: a head trickled slower than the deadline loses its connection.
import socket  # noqa: E402
import urllib.parse  # noqa: E402

u = urllib.parse.urlparse(URL)
slow = socket.create_connection((u.hostname, u.port))
slow.sendall(b"GET /v2/sandboxes HTTP/1.1\r\nHost: x\r\n")
slow.settimeout(10)
t0 = time.monotonic()
got = b""
try:
    while True:
        chunk = slow.recv(4096)
        if not chunk:
            break
        got += chunk
except socket.timeout:
    pass
held = time.monotonic() - t0
slow.close()
check("slow request head is cut off", held < 8 and (got == b"" or b" 408 " in got), repr((held, got)))
check("daemon unaffected", sb.run_code("x + 1").text == "42")

# Kill (a context still open goes with its sandbox: the Rust side checks
# that no session is left).
other.kill()
try:
    Sandbox.create(template="no-such-zygote")
    raise AssertionError("unknown template accepted")
except SandboxException as err:
    check("unknown template is a clear 404", "404" in str(err) and "no-such-zygote" in str(err), str(err))
left_open = sb.create_code_context()
sb.run_code("z = 1", context=left_open)
sb.kill()
check("kill", not sb.is_running())
check("killed sandbox gone from list", sb.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()})
check("kill again is False", Sandbox.kill(sb.sandbox_id) is False)
# The async SDK speaks the same wire.
import asyncio  # noqa: E402

from e2b_code_interpreter import AsyncSandbox  # noqa: E402


async def async_checks():
    a = await AsyncSandbox.create()
    await a.run_code("y = 1")
    out = []
    ex = await a.run_code("print('async'); y + 1", on_stdout=lambda m: out.append(m.line))
    check("async run_code", ex.text == "2" and out == ["async\n"], repr((ex, out)))
    await a.files.write("/tmp/as.txt", "A")
    check("async files", await a.files.read("/tmp/as.txt") == "A")
    r = await a.commands.run("echo hi")
    check("async commands", r.exit_code == 0 and r.stdout == "hi\n", repr(r))
    await a.kill()
    # Every stream the gateway served has ended: nothing is left waiting on it.
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    check("no stream left open", not pending, repr(pending))


asyncio.run(async_checks())
print("ALL OK", flush=True)
# Exit without interpreter finalization. The async SDK's HTTP client
# (pyqwest, Rust via pyo3) finishes reads on tokio threads and posts the
# result with loop.call_soon_threadsafe; when one lands while CPython 3.11
# finalizes, CPython ends that thread with pthread_exit and the forced unwind
# through Rust frames aborts the process (core dump: pyqwest
# ContentGenerator.__anext__ -> _write_to_self during Py_FinalizeEx). That is
# the client's teardown after every check above has passed; it says nothing
# about the gateway, so the script does not give it the chance.
os._exit(0)
