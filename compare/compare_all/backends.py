"""The backends. Each runs one round: N sandboxes requested at once, each running SNIPPET.

`round(n)` returns {"samples": [...], "teardown_s": float | None, "teardown_note": str}; a sample
is {"start", "end"} (seconds since the round's first request), "ok" (output verified) and
"detail" (why not). The caller derives wall, success and latency the same way for all.
"""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import setup
from .setup import DOCKER, IMAGE, REPO, STATE, SetupError

SNIPPET = "import numpy; print(numpy.zeros(5).tolist())"
EXPECTED = "[0.0, 0.0, 0.0, 0.0, 0.0]"
# One BLAS thread everywhere, as forkd's zygote imports numpy: same work in every backend.
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class BackendUnavailable(Exception):
    """The backend cannot run here; the message is reported in the results."""


def verify(returncode, stdout, stderr):
    out = stdout.decode(errors="replace").strip()
    if returncode == 0 and out == EXPECTED:
        return True, ""
    return False, f"exit {returncode}, stdout {out[:200]!r}, stderr {stderr.decode(errors='replace').strip()[-300:]!r}"


async def run_processes(argvs, env=None, limit_s=600):
    """Starts every argv at once; a sample per process (request = just before its exec).

    Each process gets a session of its own (setsid, as `bwrap --new-session` and container
    runtimes do): with the kernel's scheduler autogroups, a session is a scheduling group, so
    on a shared host processes left in the harness's session would get less CPU than the same
    processes in sessions of their own, whatever the sandbox.
    """
    t0 = time.perf_counter()

    async def one(argv):
        start = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE, env=env,
                                                        start_new_session=True)
            out, err = await asyncio.wait_for(proc.communicate(), limit_s)
            ok, detail = verify(proc.returncode, out, err)
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        return {"start": start - t0, "end": time.perf_counter() - t0, "ok": ok, "detail": detail}

    return await asyncio.gather(*(one(a) for a in argvs))


def interpreter_paths(python):
    """Directories an interpreter needs (prefixes and sys.path), for read-only binds."""
    code = "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix] + sys.path))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    paths = {os.path.realpath(p) for p in json.loads(out) if p and os.path.isdir(p)}
    paths.add(os.path.dirname(os.path.realpath(python)))
    return sorted(p for p in paths if p != "/usr" and not p.startswith("/usr/"))


class Backend:
    name = ""
    description = ""
    teardown_note = ""

    def prepare(self):
        """Installs/starts what the backend needs; raises BackendUnavailable or SetupError."""

    def versions(self):
        return {}

    async def round(self, n):
        raise NotImplementedError

    def close(self):
        pass


class ColdPython(Backend):
    name = "python"
    teardown_note = "none (process exit is part of the result)"

    def __init__(self, python):
        self.python = python
        self.description = f"cold `{python} -c`, no isolation"

    def prepare(self):
        check = subprocess.run([self.python, "-c", "import numpy"], capture_output=True, text=True)
        if check.returncode != 0:
            raise BackendUnavailable(f"{self.python} cannot import numpy: {check.stderr.strip()[-300:]}")

    def versions(self):
        return {"python": setup.python_facts(self.python)}

    async def round(self, n):
        env = {"PATH": "/usr/bin:/bin", **THREAD_ENV}
        samples = await run_processes([[self.python, "-c", SNIPPET]] * n, env=env)
        return {"samples": samples, "teardown_s": None}


class Bubblewrap(Backend):
    name = "bwrap"
    teardown_note = "none (bwrap exits with the program)"

    def __init__(self, python):
        self.python = python
        self.description = f"`bwrap --unshare-all` (read-only /usr, interpreter paths, /etc/alternatives, /etc/ld.so.cache), `{python} -c`"

    def prepare(self):
        setup.apt_install(["bubblewrap"])
        ColdPython(self.python).prepare()
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        for p in interpreter_paths(self.python):
            argv += ["--ro-bind", p, p]
        # Shared libraries are found through these (numpy's libblas is an alternatives symlink).
        for p in ("/etc/alternatives", "/etc/ld.so.cache"):
            if os.path.exists(p):
                argv += ["--ro-bind", p, p]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp", "--clearenv"]
        for k, v in {"PATH": "/usr/bin:/bin", **THREAD_ENV}.items():
            argv += ["--setenv", k, v]
        self.argv = argv + [self.python, "-c", SNIPPET]

    def versions(self):
        return {"bwrap": setup._first_line(["bwrap", "--version"]), "python": setup.python_facts(self.python)}

    async def round(self, n):
        return {"samples": await run_processes([self.argv] * n), "teardown_s": None}


class Docker(Backend):
    """`docker run` per sandbox (no --rm: removal is timed separately, as teardown)."""

    teardown_note = "`docker rm -f` of the round's containers (one command)"

    def __init__(self, runtime):
        self.runtime = runtime
        self.name = "docker" if runtime == "runc" else "gvisor"
        extra = "" if runtime == "runc" else " `--runtime runsc` (ptrace platform)"
        self.description = f"`docker run --network none`{extra}, image {IMAGE}"
        self.run_id = f"{os.getpid()}-{int(time.time())}"
        self.seq = 0

    def prepare(self):
        setup.ensure_docker(with_runsc=self.runtime == "runsc")
        setup.ensure_image()
        self.cleanup(stale=True)
        if self.runtime == "runsc":  # fail here with runsc's own message rather than 100 times
            p = subprocess.run([DOCKER, "run", "--rm", "--runtime", "runsc", "--network", "none", IMAGE,
                                "true"], capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                raise BackendUnavailable(f"docker run --runtime runsc failed: {p.stderr.strip()[-600:]}")

    def versions(self):
        return setup.docker_versions()

    def _names(self, n):
        self.seq += 1
        return [f"forkd-compare-{self.name}-{self.run_id}-{self.seq}-{i}" for i in range(n)]

    async def round(self, n):
        names = self._names(n)
        envargs = [a for k, v in THREAD_ENV.items() for a in ("-e", f"{k}={v}")]
        argvs = [[DOCKER, "run", "--name", name, "--label", "forkd-compare=1", "--network", "none",
                  "--runtime", self.runtime, *envargs, IMAGE, "python3", "-c", SNIPPET] for name in names]
        samples = await run_processes(argvs)
        t = time.perf_counter()
        rm = await asyncio.create_subprocess_exec(DOCKER, "rm", "-f", *names, stdout=asyncio.subprocess.DEVNULL,
                                                  stderr=asyncio.subprocess.PIPE)
        _, err = await rm.communicate()
        teardown = time.perf_counter() - t
        note = "" if rm.returncode == 0 else f"docker rm: {err.decode().strip()[-300:]}"
        return {"samples": samples, "teardown_s": teardown, "teardown_error": note}

    def cleanup(self, stale=False):
        """Removes containers this harness started (all of them when `stale`: an earlier crash)."""
        if not Path(DOCKER).exists():
            return
        flt = "label=forkd-compare=1" if stale else f"name=forkd-compare-{self.name}-{self.run_id}-"
        ids = subprocess.run([DOCKER, "ps", "-aq", "--filter", flt], capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run([DOCKER, "rm", "-f", *ids], capture_output=True)

    def close(self):
        self.cleanup()


class Forkd(Backend):
    """A private forkd daemon driven through the project's Python client (clients/python)."""

    teardown_note = "sandbox cgroups removed by the daemon after the reply: last result -> all gone"

    def __init__(self, name, python, forkd_bin, preload, warm_pool):
        self.name, self.python, self.forkd_bin = name, python, Path(forkd_bin)
        self.preload, self.warm_pool = preload, warm_pool
        pre = "numpy preloaded" if preload else "empty preload list (each sandbox imports numpy)"
        pool = f"warm pool {warm_pool}" if warm_pool else "no warm pool (fork on request)"
        self.description = f"forkd, {pre}, {pool}; zygote `{python}`"
        self.proc = None
        self.tmp = None

    def prepare(self):
        ColdPython(self.python).prepare()
        if not self.forkd_bin.exists():
            raise BackendUnavailable(f"{self.forkd_bin} not found: run `cargo build --release -p forkd -p forkd-zygote`"
                                     " (compare-all builds it unless --forkd-bin is given)")
        sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
        STATE.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=STATE))
        sock = self.tmp / "forkd.sock"
        conf = self.tmp / "forkd.toml"
        conf.write_text(f'socket = "{sock}"\n[[zygote]]\nname = "default"\npython = "{self.python}"\n'
                        f"preload = {json.dumps(self.preload)}\nwarm_pool = {self.warm_pool}\n")
        self.log = open(self.tmp / "forkd.log", "wb")
        # Its own session, as a service would run (and not the harness's scheduler autogroup).
        self.proc = subprocess.Popen([str(self.forkd_bin), "--config", str(conf)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.sock = str(sock)
        deadline = time.monotonic() + 60
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BackendUnavailable(f"forkd did not start: {self._log_tail()}")
            time.sleep(0.02)
        # The client's one connection is opened per round, in that round's event loop.
        self.cgroup_parents = []

    def _log_tail(self):
        try:
            return (self.tmp / "forkd.log").read_text()[-800:]
        except OSError:
            return "(no log)"

    def versions(self):
        v = setup._first_line([str(self.forkd_bin), "--version"])
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True).stdout.strip()
        return {"forkd": f"{v} (git {rev})", "python": setup.python_facts(self.python)}

    def _zygote_children(self):
        """Processes forked by the daemon's zygote(s): warm children waiting for a job."""
        zygotes = [int(p) for p in _children(self.proc.pid)]
        return sum(len(_children(z)) for z in zygotes)

    async def _wait_pool_full(self):
        if not self.warm_pool:
            return True
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._zygote_children() >= self.warm_pool:
                return True
            await asyncio.sleep(0.02)
        return False

    def _cgroups(self, sandbox_ids):
        if not self.cgroup_parents:
            inst = f"forkd/d{self.proc.pid}"
            self.cgroup_parents = [p for p in Path("/sys/fs/cgroup").glob(f"*/{inst}")] + \
                [p for p in [Path("/sys/fs/cgroup") / inst] if p.is_dir()]
        return [p / f"sb{i}" for p in self.cgroup_parents for i in sandbox_ids if (p / f"sb{i}").exists()]

    async def round(self, n):
        from forkd import AsyncForkd  # clients/python, stdlib only

        if self.proc.poll() is not None:
            raise BackendUnavailable(f"forkd exited ({self.proc.returncode}): {self._log_tail()}")
        async with AsyncForkd(socket=self.sock, timeout=300) as fk:
            await fk.ping()
            full = await self._wait_pool_full()
            t0 = time.perf_counter()

            async def one():
                start = time.perf_counter()
                try:
                    r = await fk.run(SNIPPET, timeout=120)
                    ok, detail = verify(r.exit_code, r.stdout, r.stderr)
                    if r.killed_by:
                        ok, detail = False, f"killed_by {r.killed_by}; {detail}"
                    sid, warm = r.sandbox, r.warm
                except Exception as e:
                    ok, detail, sid, warm = False, f"{type(e).__name__}: {e}", None, None
                return {"start": start - t0, "end": time.perf_counter() - t0, "ok": ok, "detail": detail,
                        "sandbox": sid, "warm": warm}

            samples = await asyncio.gather(*(one() for _ in range(n)))
        if self.proc.poll() is not None:
            raise BackendUnavailable(f"forkd exited ({self.proc.returncode}) during the round: {self._log_tail()}")
        t = time.perf_counter()
        ids = [s["sandbox"] for s in samples if s.get("sandbox") is not None]
        while self._cgroups(ids) and time.perf_counter() - t < 30:
            await asyncio.sleep(0.001)
        teardown = time.perf_counter() - t
        warm = sum(1 for s in samples if s.get("warm"))
        return {"samples": samples, "teardown_s": teardown,
                "note": f"{warm}/{n} served by warm children" + ("" if full else "; pool was not full at start")}

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp:  # the last daemon log stays, for post-mortems
            shutil.copy(self.tmp / "forkd.log", STATE / f"{self.name}.log")
            shutil.rmtree(self.tmp, ignore_errors=True)


def _children(pid):
    """Child pids of every thread of `pid` (a thread's children file lists only its own)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            pass
    return kids


class OpenSandbox(Backend):
    name = "opensandbox"
    teardown_note = "`sandbox.kill()` of every sandbox, concurrently (SDK -> server -> Docker)"

    def __init__(self, grace):
        self.grace = grace
        self.description = (f"OpenSandbox server + Python SDK, Docker runtime (bridge network), image {IMAGE}, "
                            f"execd stand-in (EXECD_API_GRACE_SHUTDOWN={grace})")
        self.server = None
        self.tmp = None

    def prepare(self):
        setup.ensure_docker(with_runsc=False)
        setup.ensure_image()
        setup.ensure_execd_image()
        self.py = setup.ensure_opensandbox()
        self._remove_sandboxes()
        STATE.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="opensandbox-", dir=STATE))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = self.tmp / "config.toml"
        server_bin = str(self.py.parent / "opensandbox-server")
        setup.run([server_bin, "init-config", str(conf), "--example", "docker", "--force"])
        text = conf.read_text()
        text = re.sub(r'(?m)^port = \d+', f"port = {port}", text, count=1)
        text = re.sub(r'(?m)^execd_image = .*', f'execd_image = "{setup.EXECD_IMAGE}"', text)
        text = re.sub(r'(?m)^path = "~/.opensandbox/opensandbox.db"', f'path = "{self.tmp}/opensandbox.db"', text)
        text = re.sub(r'(?m)^# publish_host = .*', 'publish_host = "127.0.0.1"', text)
        conf.write_text(text)
        self.log = open(self.tmp / "server.log", "wb")
        env = dict(os.environ, OPENSANDBOX_INSECURE_SERVER="YES")
        self.server = subprocess.Popen([server_bin, "--config", str(conf)], stdout=self.log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)
        self.addr = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise BackendUnavailable(f"opensandbox-server did not start: {self._log_tail()}")
                time.sleep(0.2)

    def _log_tail(self):
        try:
            return (self.tmp / "server.log").read_text()[-1200:]
        except OSError:
            return "(no log)"

    def versions(self):
        out = subprocess.run([str(self.py), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                             capture_output=True, text=True).stdout
        pkgs = {p["name"]: p["version"] for p in json.loads(out or "[]")}
        return {"opensandbox-server": pkgs.get("opensandbox-server", "?"),
                "opensandbox (SDK)": pkgs.get("opensandbox", "?"),
                "execd": f"stand-in {setup.EXECD_IMAGE} (compare/execd-standin), not the real execd v1.1.0",
                **setup.docker_versions()}

    async def round(self, n):
        driver = Path(__file__).with_name("opensandbox_driver.py")
        proc = await asyncio.create_subprocess_exec(str(self.py), str(driver), self.addr, IMAGE, str(n), self.grace,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise BackendUnavailable(f"OpenSandbox driver exited {proc.returncode}: {err.decode()[-800:]}"
                                     f"\nserver log: {self._log_tail()}")
        res = json.loads(out)
        res["teardown_error"] = "; ".join(res.pop("teardown_errors"))[:600]
        return res

    def _remove_sandboxes(self):
        """Containers the OpenSandbox server made (label set by it) and left: an earlier crash."""
        ids = subprocess.run([DOCKER, "ps", "-aq", "--filter", "label=opensandbox.io/id"], capture_output=True,
                             text=True).stdout.split()
        if ids:
            subprocess.run([DOCKER, "rm", "-f", *ids], capture_output=True)

    def close(self):
        if self.server and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        if self.server:
            self._remove_sandboxes()
        if self.tmp:  # the last server log stays, for post-mortems
            shutil.copy(self.tmp / "server.log", STATE / "opensandbox-server.log")
            shutil.rmtree(self.tmp, ignore_errors=True)


__all__ = ["Backend", "BackendUnavailable", "SetupError", "ColdPython", "Bubblewrap", "Docker", "Forkd",
           "OpenSandbox", "STATE"]
