"""A real Alertmanager (Debian's ``prometheus-alertmanager``) run from the shipped configuration, and the
webhook receiver it notifies: a small HTTP server on 127.0.0.1 that keeps every notification it is sent."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.net import free_port, terminate
from tests.support.poll import wait_until

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


class Webhook:
    """Alertmanager's webhook notifications (``{"status", "receiver", "alerts": [...]}``), as they arrive."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        inbox = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                inbox.put(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def alert(self, match: Callable[[dict[str, Any], dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first alert of a notification, seen before or arriving within ``timeout`` seconds, for which
        ``match(notification, alert)`` holds. Blocking: from async code, call it in a thread."""
        deadline = time.monotonic() + timeout
        while True:
            for notification in self.seen:
                for alert in notification["alerts"]:
                    if match(notification, alert):
                        return alert
            left = deadline - time.monotonic()
            try:
                self.seen.append(self.received.get(timeout=max(left, 0.001)))
            except queue.Empty:
                raise AssertionError(f"no matching alert reached the webhook in {timeout:g} s; it got: "
                                     f"{json.dumps(self.seen)[-3000:]}") from None


@contextlib.contextmanager
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    thread = threading.Thread(target=hook.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()


def local_config(webhook_url: str, smtp_password: Path) -> dict[str, Any]:
    """The shipped configuration with this test's webhook, an SMTP relay that refuses (a port nothing listens
    on: no mail leaves the machine) and notifications at once rather than after 30 s."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["global"].update(smtp_smarthost=f"127.0.0.1:{free_port()}", smtp_auth_password_file=str(smtp_password))
    config["route"].update(group_wait="0s", group_interval="1s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", ()):
            hook["url"] = webhook_url
    return config


@contextlib.contextmanager
def alertmanager_server(tmp_path: Path, webhook_url: str) -> Iterator[str]:
    """A real Alertmanager on 127.0.0.1, alone (no cluster); yields its base URL."""
    password = tmp_path / "smtp_password"
    password.write_text("not-a-real-password\n")
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump(local_config(webhook_url, password)))
    port = free_port()
    log_path = tmp_path / "alertmanager.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        ["prometheus-alertmanager", f"--config.file={config}", f"--storage.path={tmp_path / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=2).raise_for_status(), 20, what="Alertmanager ready")
        yield url
    except BaseException:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        terminate(proc)
        log.close()
