"""A Docker engine of its own (a second ``dockerd``, its data under a temporary directory, its own bridge), for
tests and benchmarks that need hosts that do not share images: every controller on the machine's engine sees
every image. Needs root, as dockerd does; stopped, its bridge and data removed, when the context ends.

It changes nothing of the host's own networking: no iptables rules, no IP forwarding sysctl. Engines started at
once by several processes each get a subnet of their own (chosen and taken under a file lock), and what an
engine of a process that died left behind (its ``/tmp/mme-*`` directory, its ``mmb*`` bridge) is swept by the
next engine's start, never what a live process owns.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.support.net import terminate
from tests.support.poll import wait_until

# Held while an engine's subnet is chosen and taken, and while leftovers are swept.
LOCK = Path("/tmp/mme-engines.lock")
# In each engine's root: the pid of the process that owns it, and its bridge's name.
OWNER, BRIDGE = "owner.pid", "bridge"


@dataclass
class Engine:
    host: str  # DOCKER_HOST
    client: docker.DockerClient


def _free_subnet() -> ipaddress.IPv4Network:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    taken = [ipaddress.ip_network(word, strict=False) for line in routes.splitlines()
             for word in line.split()[:1] if "/" in word]
    for third in range(200, 255):
        net = ipaddress.IPv4Network(f"172.31.{third}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 172.31.x.0/24 for a test engine's bridge")


@functools.cache
def _quiet_flags(binary: str) -> tuple[str, ...]:
    """The flags that keep this dockerd off the host's networking, those it knows (older ones lack some)."""
    known = subprocess.run([binary, "--help"], capture_output=True, text=True, check=False).stdout
    flags = ["--iptables=false", "--ip-masq=false"]
    flags += [f"{flag}=false" for flag in ("--ip-forward", "--ip6tables") if f"{flag} " in known]
    return tuple(flags)


def _alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unmount_under(root: Path) -> None:
    # Mounts dockerd left behind (it unmounts its own on a clean stop) would keep the data.
    for line in reversed(Path("/proc/mounts").read_text().split("\n")):
        parts = line.split()
        if len(parts) > 1 and parts[1].startswith(str(root)):
            subprocess.run(["umount", "-l", parts[1]], check=False)


def _sweep() -> None:
    """Remove the engine roots and bridges of engines whose owner and dockerd are both gone (call under LOCK)."""
    kept: set[str] = set()
    for root in Path("/tmp").glob("mme-*"):
        if not root.is_dir():
            continue
        if _alive(root / OWNER) or _alive(root / "docker.pid"):
            with contextlib.suppress(OSError):
                kept.add((root / BRIDGE).read_text().strip())
            continue
        if not (root / OWNER).exists() and not (root / "docker.pid").exists():
            continue  # not one of ours, or one being made by a version without owner files
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
    # A bridge a live dockerd uses is kept even without an owner file.
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            kept.update(arg.split("=", 1)[1] for arg in cmdline.read_bytes().decode(errors="replace").split("\0")
                        if arg.startswith("--bridge="))
    links = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True,
                           check=False).stdout
    for line in links.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if name.startswith("mmb") and name not in kept:
            subprocess.run(["ip", "link", "del", name], check=False)


@contextlib.contextmanager
def docker_engine(workdir: Path) -> Iterator[Engine]:
    binary = shutil.which("dockerd")
    assert binary and os.geteuid() == 0, "a test Docker engine needs dockerd and root"
    # Under /tmp with a short name: dockerd's sockets must fit in a Unix socket path.
    root = Path(f"/tmp/mme-{uuid.uuid4().hex[:8]}")
    bridge = f"mmb{uuid.uuid4().hex[:8]}"
    proc = None
    log = None
    made = False
    try:
        with LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _sweep()
            root.mkdir()
            (root / OWNER).write_text(str(os.getpid()))
            (root / BRIDGE).write_text(bridge)
            net = _free_subnet()
            subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
            made = True
            subprocess.run(["ip", "addr", "add", f"{next(net.hosts())}/{net.prefixlen}", "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        sock = root / "docker.sock"
        log = (workdir / f"dockerd-{bridge}.log").open("wb")
        proc = subprocess.Popen(
            [binary, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
             "--pidfile", str(root / "docker.pid"), "-H", f"unix://{sock}", f"--bridge={bridge}",
             *_quiet_flags(binary)],
            # Its own session: a Ctrl-C meant for the test run does not stop it before the cleanup does.
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # A fixed API version: the client asks the daemon for none before it is up.
        client = docker.DockerClient(base_url=f"unix://{sock}", version="1.41", timeout=120)
        started = proc

        def up() -> bool:
            if started.poll() is not None:
                raise RuntimeError(f"dockerd exited with {started.returncode}; see {workdir}/dockerd-{bridge}.log")
            with contextlib.suppress(Exception):
                return bool(client.ping())
            return False

        wait_until(up, 60, what="the test Docker engine answering", retry_on=())
        try:
            yield Engine(f"unix://{sock}", client)
        finally:
            with contextlib.suppress(Exception):
                for c in client.containers.list(all=True):
                    with contextlib.suppress(docker.errors.APIError):
                        c.remove(force=True)
            client.close()
    finally:
        if proc is not None:
            terminate(proc, timeout=30)
        if log is not None:
            log.close()
        if made:
            subprocess.run(["ip", "link", "del", bridge], check=False)
        if root.exists():
            _unmount_under(root)
            shutil.rmtree(root, ignore_errors=True)
