"""Drives `forkd mcp` with the official MCP Python SDK (PyPI `mcp`), as an
MCP client application would: stdio transport, initialize, list_tools,
call_tool. Run by forkd/tests/mcp.rs against a real daemon.

usage: client.py FORKD_BIN SOCKET [--matplotlib]   the full scenario
                                             (--matplotlib: the zygote has it)
       client.py FORKD_BIN SOCKET --down   SOCKET has no daemon behind it
       client.py FORKD_BIN SOCKET --sigterm  SIGTERM to the server
       client.py FORKD_BIN SOCKET --restart DIR   across a daemon restart
                                             (steps agreed through files in DIR)

Prints one JSON object on its last stdout line (what the Rust side checks
afterwards: the session ids and the steps that passed); exits non-zero with
the failed check's message otherwise.
"""

import asyncio
import base64
import json
import os
import signal
import sys
import time

import anyio

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TOOLS = {
    "run_code", "session_create", "session_list", "session_kill",
    "run_command", "write_file", "read_file", "list_files",
}
# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
steps = []


def check(cond, what, detail=None):
    if not cond:
        raise AssertionError(f"{what}: {detail!r}")


def texts(res):
    return [c.text for c in res.content if c.type == "text"]


def images(res):
    return [c for c in res.content if c.type == "image"]


async def call(s, tool, args, expect_error=False):
    res = await s.call_tool(tool, args)
    check(bool(res.is_error) == expect_error,
          f"{tool}({args}) is_error should be {expect_error}", texts(res))
    return res


async def scenario(s):
    init = await s.initialize()
    check(init.server_info.name == "forkd", "server name", init.server_info)
    steps.append(f"initialize: protocol {init.protocol_version}, server {init.server_info.name}")

    tools = {t.name: t for t in (await s.list_tools()).tools}
    check(set(tools) == TOOLS, "tool names", sorted(tools))
    for t in tools.values():
        check(t.input_schema.get("type") == "object", f"{t.name} schema type", t.input_schema)
        check(t.description, f"{t.name} description", t)
    rc = tools["run_code"].input_schema
    check(rc["required"] == ["code"], "run_code required", rc)
    check(set(rc["properties"]) == {"code", "session_id", "timeout_ms"}, "run_code props", rc)
    check("killed when this MCP server exits" in tools["session_create"].description,
          "session lifetime in session_create's description", tools["session_create"].description)
    ro = {n for n, t in tools.items() if t.annotations and t.annotations.read_only_hint}
    check(ro == {"session_list", "read_file", "list_files"}, "read-only hints", ro)
    check(tools["session_kill"].annotations.destructive_hint is True, "destructive hint",
          tools["session_kill"].annotations)
    steps.append(f"list_tools: {len(tools)} tools with object schemas and annotations")

    # One-shot: output, value, and a PNG display as image content.
    res = await call(s, "run_code", {"code": "print('hello'); 6 * 7"})
    check(texts(res) == ["hello\n", "42"], "one-shot texts", texts(res))
    png_b64 = base64.b64encode(PNG).decode()
    res = await call(s, "run_code", {"code": (
        "import base64\n"
        "class Dot:\n"
        f"    def _repr_png_(self): return base64.b64decode('{png_b64}')\n"
        "Dot()")})
    imgs = images(res)
    check(len(imgs) == 1 and imgs[0].mime_type == "image/png", "one-shot image", res.content)
    check(base64.b64decode(imgs[0].data) == PNG, "image bytes", imgs[0].data[:40])
    steps.append("run_code one-shot: stdout + value 42; PNG display as image content")
    if "--matplotlib" in sys.argv:
        res = await call(s, "run_code", {"code": (
            "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('mcp')\nNone")})
        imgs = images(res)
        check(len(imgs) == 1 and imgs[0].mime_type == "image/png"
              and base64.b64decode(imgs[0].data).startswith(b"\x89PNG\r\n\x1a\n"),
              "matplotlib figure as image content", res.content)
        steps.append("run_code one-shot: a matplotlib figure left open -> one PNG image content")
    # A one-shot exception: a tool result with the traceback.
    res = await call(s, "run_code", {"code": "def f():\n    raise ValueError('bad')\nf()"},
                     expect_error=True)
    tb = "\n".join(texts(res))
    check("Traceback" in tb and "ValueError: bad" in tb and "raise ValueError" in tb,
          "one-shot traceback", tb)
    steps.append("run_code one-shot exception: isError with traceback")

    # A session: state between cells.
    res = await call(s, "session_create", {"labels": {"test": "mcp"}})
    info = json.loads(texts(res)[0])
    sid = info["session_id"]
    check(info["state"] == "running" and info["killed_when_mcp_server_exits"] is True,
          "session info", info)
    res = await call(s, "run_code", {"code": "x = 41", "session_id": sid})
    res = await call(s, "run_code", {"code": "x + 1", "session_id": sid})
    check(texts(res) == ["42"], "x + 1", texts(res))
    steps.append("session_create, run_code x = 41 then x + 1 -> 42")

    # With a progress callback, output streams as it is written.
    got = []

    async def on_progress(progress, total, message):
        got.append((progress, message, time.monotonic()))

    code = "import time\nprint('a', flush=True)\ntime.sleep(0.5)\nprint('b')"
    res = await s.call_tool("run_code", {"code": code, "session_id": sid},
                            progress_callback=on_progress)
    done = time.monotonic()
    check(not res.is_error and texts(res) == ["a\nb\n"], "streamed cell result", texts(res))
    check([(p, m) for p, m, _ in got] == [(1, "a\n"), (2, "b\n")], "progress messages", got)
    check(done - got[0][2] >= 0.4, "'a' came before the cell ended", (got, done))
    got.clear()
    res = await s.call_tool("run_command", {"command": "echo out; echo err >&2", "session_id": sid},
                            progress_callback=on_progress)
    check(sorted(m for _, m, _ in got) == ["[stderr] err\n", "out\n"], "command progress", got)
    steps.append("progress callback: a cell's and a command's output streamed as progress "
                 "notifications while they run")

    res = await call(s, "run_command", {"command": "echo hi", "session_id": sid})
    check(texts(res) == ["exit code 0", "hi\n"], "echo hi", texts(res))
    res = await call(s, "run_command", {"command": "echo oops >&2; exit 3", "session_id": sid},
                     expect_error=True)
    check(texts(res) == ["exit code 3", "[stderr]\noops\n"], "exit 3", texts(res))
    steps.append("run_command: echo hi -> exit code 0 + hi; exit 3 -> isError")

    await call(s, "write_file", {"session_id": sid, "path": "notes.txt", "content": "héllo mcp\n"})
    res = await call(s, "read_file", {"session_id": sid, "path": "/tmp/notes.txt"})
    check(texts(res) == ["héllo mcp\n"], "text round trip", texts(res))
    await call(s, "write_file", {"session_id": sid, "path": "dot.png",
                                 "content_base64": base64.b64encode(PNG).decode()})
    res = await call(s, "read_file", {"session_id": sid, "path": "dot.png"})
    imgs = images(res)
    check(len(imgs) == 1 and base64.b64decode(imgs[0].data) == PNG, "png round trip", res.content)
    # The code sees what the tools wrote.
    res = await call(s, "run_code", {"session_id": sid,
                                     "code": "open('/tmp/notes.txt', encoding='utf-8').read()"})
    check(texts(res) == ["'héllo mcp\\n'"], "file seen by code", texts(res))
    res = await call(s, "read_file", {"session_id": sid, "path": "missing.txt"}, expect_error=True)
    check("not_found" in texts(res)[0], "missing file", texts(res))
    res = await call(s, "read_file", {"session_id": sid, "path": "/tmp"}, expect_error=True)
    check("is a dir" in texts(res)[0], "directory", texts(res))
    await call(s, "run_command", {"command": "head -c 9000000 /dev/zero > big", "session_id": sid})
    res = await call(s, "read_file", {"session_id": sid, "path": "big"}, expect_error=True)
    check("9000000 bytes, more than read_file returns" in texts(res)[0], "big file", texts(res))
    steps.append("write_file/read_file: text and PNG round trips; missing file, directory, "
                 "9 MB file -> isError")

    res = await call(s, "list_files", {"session_id": sid})
    entries = {e["name"]: e for e in json.loads(texts(res)[0])}
    check("notes.txt" in entries and entries["notes.txt"]["type"] == "file"
          and entries["notes.txt"]["size"] == len("héllo mcp\n".encode()), "listing", entries)
    check("dot.png" in entries and "big" in entries, "listing png", entries)
    steps.append("list_files: notes.txt and dot.png with sizes")

    # An exception in the session: a tool result; the session lives on.
    res = await call(s, "run_code", {"code": "1 / 0", "session_id": sid}, expect_error=True)
    tb = "\n".join(texts(res))
    check("ZeroDivisionError: division by zero" in tb and "Traceback" in tb, "traceback", tb)
    res = await call(s, "run_code", {"code": "x", "session_id": sid})
    check(texts(res) == ["41"], "state after exception", texts(res))
    res = await call(s, "run_code", {"code": "import time; time.sleep(30)", "session_id": sid,
                                     "timeout_ms": 300}, expect_error=True)
    check(any("timeout" in t for t in texts(res)), "timeout note", texts(res))
    # A call the client cancels interrupts the cell (the next one does not
    # wait 30 s for it) and the session keeps its state.
    t0 = time.monotonic()
    with anyio.move_on_after(1.0) as scope:
        await s.call_tool("run_code", {"code": "import time; time.sleep(30); y = 1",
                                       "session_id": sid})
    check(scope.cancelled_caught, "the long cell should still run after 1 s")
    res = await call(s, "run_code", {"code": "x", "session_id": sid})
    elapsed = time.monotonic() - t0
    check(texts(res) == ["41"] and elapsed < 15, "after a cancelled cell", (texts(res), elapsed))
    res = await call(s, "run_code", {"code": "y", "session_id": sid}, expect_error=True)
    check(any("NameError" in t for t in texts(res)), "the cancelled cell stopped", texts(res))
    steps.append("session exception -> isError with traceback; timeout -> isError; a cancelled "
                 f"call interrupts its cell (next cell after {elapsed:.1f} s); state kept")

    # Bad arguments: tool errors that say what is wrong.
    res = await call(s, "run_code", {}, expect_error=True)
    check("missing field `code`" in texts(res)[0], "missing code", texts(res))
    res = await call(s, "run_code", {"code": 5}, expect_error=True)
    check("invalid type: integer `5`, expected a string" in texts(res)[0], "wrong type", texts(res))
    res = await call(s, "write_file", {"session_id": sid, "path": "a"}, expect_error=True)
    check("exactly one of content" in texts(res)[0], "write_file without content", texts(res))
    res = await call(s, "session_kill", {"session_id": "s-0000"}, expect_error=True)
    check("unknown_session" in texts(res)[0], "unknown session", texts(res))
    steps.append("bad arguments (missing code, wrong type, no content, unknown session) -> isError")

    # Sessions to check after exit: one kept, one left to the exit kill.
    kept = json.loads(texts(await call(s, "session_create", {"keep": True}))[0])["session_id"]
    left = json.loads(texts(await call(s, "session_create", {}))[0])["session_id"]
    listing = json.loads(texts(await call(s, "session_list", {}))[0])
    flags = {r["session_id"]: r["killed_when_mcp_server_exits"] for r in listing}
    check(flags.get(sid) is True and flags.get(left) is True and flags.get(kept) is False,
          "session_list flags", flags)
    only = json.loads(texts(await call(s, "session_list", {"labels": {"test": "mcp"}}))[0])
    check([r["session_id"] for r in only] == [sid], "label filter", only)
    steps.append("session_list: ownership flags and label filter")

    res = await call(s, "session_kill", {"session_id": sid})
    check(json.loads(texts(res)[0])["state"] == "ended", "killed", texts(res))
    res = await call(s, "run_code", {"code": "x", "session_id": sid}, expect_error=True)
    check("session_ended" in texts(res)[0] or "unknown_session" in texts(res)[0],
          "killed session", texts(res))
    steps.append("session_kill; the killed session refuses run_code (isError)")
    return {"kept": kept, "left_open": left, "killed": sid}


async def down(s):
    await s.initialize()
    res = await call(s, "run_code", {"code": "1"}, expect_error=True)
    msg = texts(res)[0]
    check("not running" in msg and "forkd --socket" in msg, "daemon-down message", msg)
    steps.append("daemon down: run_code -> isError saying how to start forkd")
    return {}


async def flag(dir, n, wait=False):
    """Step n of the restart dance: written by us, or awaited from the test."""
    path = os.path.join(dir, f"flag.{n}")
    if not wait:
        open(path, "w").close()
        return
    for _ in range(1200):
        if os.path.exists(path):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the test never wrote {path}")


async def restart(s, dir):
    """One MCP server across a daemon restart: errors while it is gone, and
    it reconnects by itself once it is back."""
    await s.initialize()
    res = await call(s, "run_code", {"code": "1 + 1"})
    check(texts(res) == ["2"], "before the restart", texts(res))
    await flag(dir, 1)
    await flag(dir, 2, wait=True)  # the daemon is gone
    res = await call(s, "run_code", {"code": "1 + 1"}, expect_error=True)
    # A daemon stopping answers shutting_down on the connection it still
    # holds; once it is gone nothing listens.
    check("not running" in texts(res)[0] or "shutting_down" in texts(res)[0],
          "while down", texts(res))
    await flag(dir, 3)
    await flag(dir, 4, wait=True)  # a new daemon on the same socket
    res = await call(s, "run_code", {"code": "6 * 7"})
    check(texts(res) == ["42"], "after the restart", texts(res))
    steps.append("daemon restart: isError while down, reconnected by itself after")
    return {}


def server_pid():
    """The pid of our `forkd mcp` child (the SDK does not expose it)."""
    me = str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == "forkd" and rest[1] == me:
            return int(pid)
    raise AssertionError("no forkd child found")


async def sigterm(s):
    """SIGTERM to the server ends it like a closed stdin: its sessions are killed."""
    await s.initialize()
    sid = json.loads(texts(await call(s, "session_create", {}))[0])["session_id"]
    pid = server_pid()
    os.kill(pid, signal.SIGTERM)
    for _ in range(400):
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("forkd mcp did not exit on SIGTERM")
    steps.append("SIGTERM: forkd mcp exited")
    return {"session": sid}


async def main():
    forkd, socket = sys.argv[1], sys.argv[2]
    params = StdioServerParameters(command=forkd, args=["mcp", "--socket", socket])
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            if "--down" in sys.argv:
                out = await down(s)
            elif "--sigterm" in sys.argv:
                out = await sigterm(s)
            elif "--restart" in sys.argv:
                out = await restart(s, sys.argv[sys.argv.index("--restart") + 1])
            else:
                out = await scenario(s)
    out["steps"] = steps
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # the steps that passed, then the failure (out of anyio's groups)
        def leaves(e):
            for x in getattr(e, "exceptions", None) or []:
                yield from leaves(x)
            if not getattr(e, "exceptions", None):
                yield e
        print("passed before the failure:", *steps, sep="\n  ", file=sys.stderr)
        for x in leaves(e):
            print(f"FAILED: {type(x).__name__}: {x}", file=sys.stderr)
        sys.exit(1)
