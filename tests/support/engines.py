"""A Docker engine of its own (a second ``dockerd``, its data under a temporary directory, its own bridge), for
tests and benchmarks that need hosts that do not share images: every controller on the machine's engine sees
every image. Needs root, as dockerd does; stopped, its bridge and data removed, when the context ends."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def docker_engine(workdir: Path) -> Iterator[Engine]:
    binary = shutil.which("dockerd")
    assert binary and os.geteuid() == 0, "a test Docker engine needs dockerd and root"
    # Under /tmp with a short name: dockerd's sockets must fit in a Unix socket path.
    root = Path(f"/tmp/mme-{uuid.uuid4().hex[:8]}")
    root.mkdir()
    bridge = f"mmb{uuid.uuid4().hex[:8]}"
    net = _free_subnet()
    gateway = f"{next(net.hosts())}/{net.prefixlen}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    proc = None
    try:
        subprocess.run(["ip", "addr", "add", gateway, "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        sock = root / "docker.sock"
        log = (workdir / f"dockerd-{bridge}.log").open("wb")
        proc = subprocess.Popen(
            [binary, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
             "--pidfile", str(root / "docker.pid"), "-H", f"unix://{sock}", f"--bridge={bridge}",
             "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT)
        # A fixed API version: the client asks the daemon for none before it is up.
        client = docker.DockerClient(base_url=f"unix://{sock}", version="1.41", timeout=120)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {proc.returncode}; see {log.name}")
            with contextlib.suppress(Exception):
                return bool(client.ping())
            return False

        wait_until(up, 60, what="the test Docker engine answering", retry_on=())
        try:
            yield Engine(f"unix://{sock}", client)
        finally:
            for c in client.containers.list(all=True):
                with contextlib.suppress(docker.errors.APIError):
                    c.remove(force=True)
            client.close()
    finally:
        if proc is not None:
            terminate(proc, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], check=False)
        # Mounts dockerd left behind (it unmounts its own on a clean stop) would keep the data.
        mounts = Path("/proc/mounts").read_text().split("\n")
        for line in reversed(mounts):
            parts = line.split()
            if len(parts) > 1 and parts[1].startswith(str(root)):
                subprocess.run(["umount", "-l", parts[1]], check=False)
        shutil.rmtree(root, ignore_errors=True)
