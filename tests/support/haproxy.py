"""A real HAProxy (Debian's 2.6, ``haproxy -db``) run on a configuration written for a test or a benchmark,
and tiny HTTP servers to put behind it; what the gateway's latency histograms expose."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from gateway import latency
from tests.support.net import free_port, terminate, wait_for_port


@contextmanager
def running_haproxy(config: str, workdir: Path, ports: list[int], name: str = "haproxy",
                    env: dict[str, str] | None = None) -> Iterator[Path]:
    """HAProxy on ``config`` (checked with ``-c`` first), with ``env`` added to its environment, until the
    block ends, once every port of ``ports`` listens; yields its log, printed when the block fails."""
    path = workdir / f"{name}.cfg"
    path.write_text(config)
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            for port in ports:
                wait_for_port(port, 20, proc)
            yield log_path
        except BaseException:
            print(log_path.read_text()[-4000:])
            raise
        finally:
            terminate(proc)


class _Replica(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ReplicaServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.server.delay:
            time.sleep(self.server.delay)
        status = 500 if self.path.endswith("/fail") else 200
        body = b"ok\n"
        self.send_response(status)
        self.send_header("x-replica", self.server.name)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _ReplicaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, delay: float) -> None:
        self.name = name
        self.delay = delay
        super().__init__(("127.0.0.1", 0), _Replica)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # HAProxy closing a kept-alive connection as it stops is no error of the test's.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def replica(name: str, delay: float = 0.0) -> Iterator[int]:
    """A model server stand-in on a port of the kernel's choice (yielded), until the block ends: every GET
    answers after ``delay`` seconds, 500 for a path ending in ``/fail``, else 200, with header ``x-replica: <name>``."""
    server = _ReplicaServer(name, delay)
    thread = threading.Thread(target=server.serve_forever, name=f"replica-{name}", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


_EXPOSITION = """\
global
    {load}
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend gateway
    bind 127.0.0.1:{port}
    {start}
    {observe0}
    {observe1}
    default_backend nobody
backend nobody
    {service}
    server lost 127.0.0.1:{port} disabled
frontend metrics
    bind 127.0.0.1:{metrics}
    {serve}
"""


def latency_exposition(workdir: Path) -> str:
    """What a gateway's ``/metrics/latency`` answers once it has observed one request (a 503: no replica)."""
    port, metrics = free_port(), free_port()
    config = _EXPOSITION.format(load=latency.LOAD, start=latency.START, observe0=latency.OBSERVE[0],
                                observe1=latency.OBSERVE[1], service=latency.service_rule("alice", "model"),
                                serve=latency.SERVE, port=port, metrics=metrics)
    with running_haproxy(config, workdir, [port, metrics], "exposition"):
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 503
        answer = httpx.get(f"http://127.0.0.1:{metrics}{latency.PATH}", timeout=10)
        answer.raise_for_status()
        return answer.text
