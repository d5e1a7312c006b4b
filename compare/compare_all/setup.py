"""Installs and starts what the backends need, idempotently, and collects host facts.

Every step checks before it acts (package installed? daemon answering? image present?), so a
second run costs seconds. Nothing here names a package registry: the Debian mirror is read from
the machine's own apt sources.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / "target" / "compare"  # harness-owned venvs, rootfs, logs (gitignored)
IMAGE = "forkd-compare/python-numpy:bookworm"
EXECD_IMAGE = "forkd-compare/execd-standin:1"
DOCKER = "/usr/bin/docker"  # Debian's docker.io client, not whatever else is on PATH
DAEMON_JSON = Path("/etc/docker/daemon.json")


class SetupError(Exception):
    """A prerequisite could not be provided; the message says what failed and what to do."""


def run(cmd, timeout=600, check=True, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise SetupError(f"{' '.join(map(str, cmd[:6]))} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    return p


def log(msg):
    print(f"compare-all: {msg}", flush=True)


def apt_install(packages):
    """Installs the Debian packages that are missing (one apt transaction, waits for the lock)."""
    missing = []
    for pkg in packages:
        p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in p.stdout:
            missing.append(pkg)
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", *missing]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if p.returncode != 0:  # stale package lists on a fresh machine: refresh once and retry
        run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-q"], env=env, timeout=600)
        run(cmd, env=env, timeout=1200)


def debian_mirror():
    """The Debian archive URI this machine's apt uses (deb822 .sources or one-line lists)."""
    files = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            uri = m.group(1)
            if "security" not in uri:
                return uri
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
    raise SetupError("no Debian mirror found in /etc/apt/sources.list(.d): debootstrap needs one")


# ---------------------------------------------------------------------------------------------
# Docker


def docker_ok():
    return subprocess.run([DOCKER, "info"], capture_output=True, timeout=30).returncode == 0


def merge_daemon_json():
    """Registers runsc (ptrace platform, its own --network=none) without clobbering other keys.

    Debian's runsc refuses to start in the host's network namespace unless told
    --network=none; the KVM platform spins forever in this nested VM, so ptrace it is.
    Returns True when the file changed (dockerd must then reload it).
    """
    conf = {}
    if DAEMON_JSON.exists():
        try:
            conf = json.loads(DAEMON_JSON.read_text() or "{}")
        except json.JSONDecodeError as e:
            raise SetupError(f"{DAEMON_JSON} is not valid JSON ({e}); fix it by hand, it is not overwritten")
    want = {"path": "/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace", "--network=none"]}
    runtimes = conf.setdefault("runtimes", {})
    if runtimes.get("runsc") == want:
        return False
    runtimes["runsc"] = want
    DAEMON_JSON.parent.mkdir(parents=True, exist_ok=True)
    DAEMON_JSON.write_text(json.dumps(conf, indent=2) + "\n")
    return True


def ensure_docker(with_runsc):
    apt_install(["docker.io"] + (["runsc"] if with_runsc else []))
    changed = merge_daemon_json() if with_runsc else False
    if docker_ok():
        if changed:  # dockerd re-reads runtimes on SIGHUP
            pid = run(["pidof", "dockerd"], check=False).stdout.split()
            for p in pid:
                os.kill(int(p), 1)
            time.sleep(1)
        return
    # No systemd on these machines: start dockerd in the background, detached from us.
    STATE.mkdir(parents=True, exist_ok=True)
    logf = open(STATE / "dockerd.log", "ab")
    log("starting dockerd (log: target/compare/dockerd.log)")
    subprocess.Popen(["/usr/sbin/dockerd"], stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                     start_new_session=True)
    for _ in range(120):
        if docker_ok():
            return
        time.sleep(0.5)
    raise SetupError("dockerd did not answer within 60 s; see target/compare/dockerd.log")


def image_exists(name):
    return subprocess.run([DOCKER, "image", "inspect", name], capture_output=True).returncode == 0


def ensure_image():
    """Debian bookworm + python3 + python3-numpy, built with debootstrap and `docker import`."""
    if image_exists(IMAGE):
        return
    apt_install(["debootstrap"])
    rootfs = STATE / "rootfs-bookworm"
    mirror = debian_mirror()
    if not (rootfs / "usr/bin/python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        log(f"debootstrap bookworm with python3-numpy into {rootfs} (about a minute)")
        # In a private mount namespace: debootstrap mounts /proc and /sys inside the tree, and
        # those mounts must never show up on (or leak into) the host's mount table.
        run(["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase", "--include=python3,python3-numpy", "bookworm",
             str(rootfs), mirror], timeout=1800)
    log(f"docker import {IMAGE}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run([DOCKER, "import", "-c", 'CMD ["python3"]', "-", IMAGE], stdin=tar.stdout, timeout=900)
    tar.wait()


def ensure_execd_image():
    """The stand-in for OpenSandbox's execd image (what it is and what differs: compare/METHODOLOGY.md)."""
    src = REPO / "compare" / "execd-standin"
    digest = run(["sha256sum", *sorted(str(p) for p in src.iterdir())]).stdout
    label = re.sub(r"\s+", " ", digest).strip()
    if image_exists(EXECD_IMAGE):
        have = run([DOCKER, "image", "inspect", "-f", '{{index .Config.Labels "forkd-compare.src"}}',
                    EXECD_IMAGE]).stdout.strip()
        if have == label:
            return
    log(f"docker build {EXECD_IMAGE}")
    run([DOCKER, "build", "-q", "--build-arg", f"BASE={IMAGE}", "--label", f"forkd-compare.src={label}",
         "-t", EXECD_IMAGE, str(src)], timeout=600)


# ---------------------------------------------------------------------------------------------
# Venvs


def ensure_venv(path, packages, python="/usr/bin/python3"):
    """A harness-owned venv with `packages` (pip, as configured on this machine)."""
    py = path / "bin" / "python"
    marker = path / ".forkd-compare-ok"
    if py.exists() and marker.exists() and marker.read_text() == " ".join(packages):
        return py
    apt_install(["python3-venv"])
    shutil.rmtree(path, ignore_errors=True)
    log(f"creating {path} with {' '.join(packages)}")
    run([python, "-m", "venv", str(path)])
    run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages], timeout=1200)
    marker.write_text(" ".join(packages))
    return py


def ensure_opensandbox():
    return ensure_venv(STATE / "opensandbox-venv", ["opensandbox-server", "opensandbox"])


# ---------------------------------------------------------------------------------------------
# Host facts


def _first_line(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        out = (p.stdout or p.stderr).strip()
        return out.splitlines()[0] if out else f"(no output, exit {p.returncode})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"


def cgroup_mode():
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2 (unified)"
    uni = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if uni.exists():
        ctl = uni.read_text().strip() or "no controllers"
        return f"v1 hybrid (cgroup2 at /sys/fs/cgroup/unified: {ctl})"
    return "v1"


def python_facts(python):
    return _first_line([python, "-c", "import sys, numpy; print(f'Python {sys.version.split()[0]} "
                        "({sys.executable}), numpy {numpy.__version__}')"])


def host_facts():
    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    os_name = ""
    try:
        os_name = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name,
        "cgroup": cgroup_mode(),
        "loadavg_at_start": os.getloadavg(),
    }


def docker_versions():
    v = {}
    if not Path(DOCKER).exists():
        return {"docker": "not installed"}
    v["docker"] = _first_line([DOCKER, "version", "-f", "client {{.Client.Version}}, server {{.Server.Version}}"])
    v["runc"] = _first_line(["runc", "--version"])
    v["runsc"] = " ".join(_first_line(["runsc", "--version"]).split()[:3]) if shutil.which("runsc") else "not installed"
    if image_exists(IMAGE):
        v["image"] = IMAGE + ": " + _first_line([DOCKER, "run", "--rm", "--network", "none", IMAGE, "python3", "-c",
                                                 "import sys, numpy; print('Python', sys.version.split()[0], "
                                                 "'numpy', numpy.__version__)"])
    return v
