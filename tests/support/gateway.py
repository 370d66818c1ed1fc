"""What the gateway's tests run it against: a fake hub serving a routing table the test edits, replicas
(``tests.support.echo_backend`` processes), the agent itself as ``mmanager gateway serve``, and a client
that sends a steady rate of requests over keep-alive connections and counts what failed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.support.net import free_port, wait_for_port


class FakeHub:
    """``GET /api/gateway/routes`` (with ``If-None-Match``), ``PUT /api/gateways/{id}`` and
    ``POST /api/gateway/wake/{service id}``, on a thread.
    ``set(...)`` publishes a new table under the next version."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.table: dict[str, Any] = {"version": 1, "domain": None, "services": [], "service_keys": []}
        self.registrations: list[tuple[str, dict[str, Any]]] = []
        # Services the wake endpoint answers 202 for (it is starting them), and the wakes asked for.
        self.idle: set[str] = set()
        self.wakes: list[str] = []
        self.port = free_port()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != f"Bearer {hub.key}":
                    return self._send(401)
                with hub.lock:
                    table = json.dumps(hub.table).encode()
                    version = hub.table["version"]
                if self.headers.get("If-None-Match") == f'"{version}"':
                    return self._send(304)
                self._send(200, table)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {hub.key}":
                    return self._send(401)
                service_id = self.path.rsplit("/", 1)[-1]
                with hub.lock:
                    hub.wakes.append(service_id)
                    waking = service_id in hub.idle
                self._send(202 if waking else 200, json.dumps({"waking": waking}).encode())

            def do_PUT(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                if self.headers.get("Authorization") != f"Bearer {hub.key}":
                    return self._send(401)
                with hub.lock:
                    hub.registrations.append((self.path, body))
                self._send(200, b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set(self, **changes: Any) -> int:
        """Publish the table with ``changes`` (whole top-level fields) under a new version; that version."""
        with self.lock:
            self.table = {**self.table, **changes, "version": self.table["version"] + 1}
            return int(self.table["version"])

    def last_registration(self) -> dict[str, Any] | None:
        with self.lock:
            return self.registrations[-1][1] if self.registrations else None


@dataclass
class Replica:
    name: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Replica:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.echo_backend", str(self.port), self.name],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, 10, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def entry(self, state: str = "ready") -> dict[str, Any]:
        return {"id": self.name, "address": self.address, "state": state}


def service(sid: str, owner: str, name: str, replicas: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": sid, "owner": owner, "name": name, "state": "running", "private": False,
            "rate_limit_per_minute": 0, "max_body_bytes": 0, "health_path": "/health", "replicas": replicas, **extra}


@dataclass
class Gateway:
    """``mmanager gateway serve`` as a process of its own (its own session: a kill takes HAProxy too)."""

    hub: FakeHub
    state_dir: Path
    log: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # MMANAGER_HUB_URL; None: the fake hub's.
    hub_url: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Gateway:
        env = {**os.environ, "MMANAGER_HUB_URL": self.hub_url or self.hub.url, "MMANAGER_API_KEY": self.hub.key,
               "MMANAGER_GATEWAY_HEARTBEAT": "0.5", "LOG_LEVEL": "DEBUG"}
        args = [sys.executable, "-m", "mmanager.cli", "gateway", "serve", "--host", "127.0.0.1", "--port",
                str(self.port), "--metrics-port", str(self.metrics_port), "--state-dir", str(self.state_dir),
                "--id", "gw-test", "--poll", "0.1"]
        self.proc = subprocess.Popen(args, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_port(self.port, 20, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class Load:
    """``rate`` requests a second, spread over ``connections`` keep-alive connections, on a thread of its
    own until ``stop()``; every answer's status (or error's type) and every replica that answered counted."""

    def __init__(self, url: str, rate: float = 200, connections: int = 4,
                 headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.rate = rate
        self.connections = connections
        self.headers = headers or {}
        self.outcomes: Counter[str] = Counter()
        self.servers: Counter[str] = Counter()
        self.errors: list[str] = []
        # time.monotonic() of each failure; of each 200's sending and answer.
        self.failed_at: list[float] = []
        self.answered: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        self._thread.join(30)
        return self

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failures(self) -> int:
        return self.sent - self.outcomes["200"]

    def mark(self) -> Callable[[], int]:
        """A counter of the requests sent from now on."""
        start = self.sent
        return lambda: self.sent - start

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
        async with httpx.AsyncClient(limits=limits, timeout=10.0, headers=self.headers) as client:
            await asyncio.gather(*(self._worker(client, i) for i in range(self.connections)))

    async def _worker(self, client: httpx.AsyncClient, index: int) -> None:
        period = self.connections / self.rate
        next_at = time.monotonic() + index * period / self.connections
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                response = await client.get(self.url)
                self.outcomes[str(response.status_code)] += 1
                if response.status_code == 200:
                    self.answered.append((sent, time.monotonic()))
                    # The echo replicas say who answered; a real service may not.
                    answer = response.json()
                    self.servers[answer.get("server", "") if isinstance(answer, dict) else ""] += 1
                else:
                    self.errors.append(f"{response.status_code} {response.text[:200]}")
                    self.failed_at.append(time.monotonic())
            except httpx.HTTPError as exc:
                self.outcomes[type(exc).__name__] += 1
                self.errors.append(repr(exc))
                self.failed_at.append(time.monotonic())
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
