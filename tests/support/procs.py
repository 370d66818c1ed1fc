"""A whole deployment on this machine, as real processes started with the
``mmanager`` command: hub replicas and controllers, on a real PostgreSQL and
the real Docker engine. The failure tests and the failover benchmark drive
it: kill -9, SIGSTOP and SIGCONT, restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx

from hub.migrate import on_migrated
from hub.services.users import create_user
from mmanager.client import Client
from tests.support.net import free_port, port_free, wait_for_port

MMANAGER = [sys.executable, "-m", "mmanager.cli"]


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    port: int
    scheme: str = "http"
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        out = self.log.open("ab")
        self.popen = subprocess.Popen([*MMANAGER, *self.args], env={**os.environ, **self.env}, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_listening(self, timeout: float = 20) -> Proc:
        wait_for_port(self.port, timeout, self.popen)
        return self

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.signal(signal.SIGKILL)
        assert self.popen is not None
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(timeout=5)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


@dataclass
class LocalDeployment:
    db_url: str
    workdir: Path
    interval: float = 1.0
    grace: float = 3.0
    key: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hub_ports: list[int] = field(default_factory=list)
    hubs: list[Proc] = field(default_factory=list)
    controllers: dict[str, Proc] = field(default_factory=dict)
    gateways: dict[str, Proc] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    extra_hub_env: dict[str, str] = field(default_factory=dict)
    extra_controller_env: dict[str, str] = field(default_factory=dict)
    # MMANAGER_TLS_* for every hub and controller; with a certificate, they all serve https.
    tls_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_env.get("MMANAGER_TLS_CERT") else "http"

    # ------------------------------------------------------------- layout

    def plan_hubs(self, n: int) -> None:
        """Pick the hub ports up front, so controllers know every replica's URL."""
        self.hub_ports = [free_port() for _ in range(n)]

    def add_controller(self, name: str, server_type: str = "cpu", priority: int = 1, weight: int = 100,
                       max_containers: int = 40, gpus: str | None = None, push: bool = True,
                       listed: bool = True, env: dict[str, str] | None = None) -> Proc:
        """``listed=False``: left out of MMANAGER_CONTROLLERS, the hub learns of it from its heartbeats only;
        ``env``: this controller's own settings on top (e.g. its DOCKER_HOST)."""
        port = free_port()
        cid = f"{name}-{self.run}"
        env = {"MMANAGER_API_KEY": self.key, "SERVER_ID": cid, "SERVER_TYPE": server_type,
               "MAX_CONTAINERS": str(max_containers), "CONTROLLER_URL": f"{self.scheme}://127.0.0.1:{port}",
               "PUBLISH_IP": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "INFO",
               "MMANAGER_MODEL_CACHE_DIR": str(self.workdir / f"models-{cid}"),
               "MMANAGER_JOB_DIR": str(self.workdir / f"jobs-{cid}"), **self.tls_env,
               **self.extra_controller_env, **(env or {})}
        if gpus:
            env["GPU_DEVICES"] = gpus
        if push:
            assert self.hub_ports, "plan_hubs() first"
            env["MMANAGER_HUB_URL"] = ",".join(f"{self.scheme}://127.0.0.1:{p}" for p in self.hub_ports)
        proc = Proc(cid, ["controller", "serve", "--host", "127.0.0.1"], env, self.workdir / f"{cid}.log", port,
                    self.scheme)
        self.controllers[cid] = proc
        if listed:
            self.entries.append({"id": cid, "url": proc.url, "server_type": server_type, "priority": priority,
                                 "weight": weight})
        return proc

    @property
    def hub_env(self) -> dict[str, str]:
        return {"MMANAGER_DATABASE_URL": self.db_url, "MMANAGER_API_KEY": self.key,
                "MMANAGER_CONTROLLERS": json.dumps(self.entries),
                "MMANAGER_HEARTBEAT_INTERVAL": str(self.interval), "MMANAGER_HEARTBEAT_GRACE": str(self.grace),
                "MMANAGER_MODEL_STORE": str(self.workdir / "model-store"),
                "MMANAGER_ARTIFACT_STORE": str(self.workdir / "artifact-store"), **self.tls_env, **self.extra_hub_env}

    def create_admin(self, name: str = "root") -> str:
        """What ``mmanager users create root --admin`` does, in this process: a CLI process of its own would cost
        a lab's start a Python start and the hub's imports."""
        # In a thread of its own: a caller may be inside a running event loop.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(on_migrated, self.db_url, lambda session: create_user(session, name, True)).result()[1]

    def hub(self, i: int = 0) -> Proc:
        if not self.hub_ports:
            self.plan_hubs(1)
        while len(self.hubs) <= i:
            port = self.hub_ports[len(self.hubs)]
            self.hubs.append(Proc(f"hub{len(self.hubs)}", ["hub", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                  self.hub_env, self.workdir / f"hub{len(self.hubs)}.log", port, self.scheme))
        return self.hubs[i]

    def add_gateway(self, name: str = "gw", hub: int = 0) -> Proc:
        """A gateway (``mmanager gateway serve``) following hub replica ``hub``; started with ``start``, or
        by hand after it. Its metrics port is ``port + 1``."""
        port = free_port()
        while not port_free(port + 1):
            port = free_port()
        env = {"MMANAGER_HUB_URL": f"{self.scheme}://127.0.0.1:{self.hub_ports[hub]}", "MMANAGER_API_KEY": self.key,
               "MMANAGER_GATEWAY_POLL": "0.1", "LOG_LEVEL": "INFO"}
        proc = Proc(name, ["gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                           "--state-dir", str(self.workdir / name), "--id", name], env,
                    self.workdir / f"{name}.log", port)
        self.gateways[name] = proc
        return proc

    def start(self, hubs: int = 1) -> None:
        # All at once, as a lab's servers come up: controllers and gateways retry the hub until it answers.
        first = [*self.controllers.values(), *([self.hub(0)] if hubs else []), *self.gateways.values()]
        for proc in first:
            proc.start()
        for proc in first:
            # The hub migrates the database first.
            proc.wait_listening(30)
        for i in range(1, hubs):
            # The other replicas start once the first answers (it migrated the database).
            self.hub(i).start()
            self.hub(i).wait_listening(30)

    def stop(self, docker_client: docker.DockerClient | None = None) -> None:
        for proc in [*self.gateways.values(), *self.hubs, *self.controllers.values()]:
            proc.stop()
        if docker_client is not None:
            for cid in self.controllers:
                for c in docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={cid}"}):
                    c.remove(force=True)

    def logs(self) -> str:
        """The tail of every process's log (MM_LOG_TAIL characters each), for a failed test's report."""
        tail = int(os.environ.get("MM_LOG_TAIL", "3000"))
        procs = [*self.hubs, *self.controllers.values(), *self.gateways.values()]
        return "\n".join(f"--- {p.log.name}\n{p.log.read_text()[-tail:]}" for p in procs if p.log.exists())


@contextmanager
def stopped_after(dep: LocalDeployment, request: Any, docker_client: docker.DockerClient) -> Iterator[LocalDeployment]:
    """For a fixture: afterwards every process stops and its containers go; a failed test
    (``request``: the fixture's pytest request) gets every process's log printed."""
    try:
        yield dep
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(dep.logs())
        dep.stop(docker_client)


def api(base_url: str, token: str) -> httpx.Client:
    """Raw HTTP to the hub's API, for what checks status codes and bodies as they are (or calls no SDK call
    covers); ``sdk`` for the rest."""
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def sdk(base_url: str, token: str) -> Client:
    """The hub's API through the SDK (``mmanager.client``), as users' programs speak to it."""
    return Client(url=base_url, token=token, timeout=60)


def running_copies(docker_client: docker.DockerClient, service_id: str) -> list[Any]:
    return docker_client.containers.list(filters={"label": f"mmanager.service={service_id}", "status": "running"})
