"""`make demo`: start `mmanager dev` (hub, controller and gateway), register the reference model types
(modelserver/catalog.json), deploy the DNABERT2-style model service from its type through the hub's HTTP
API as a user would, call `/predict` through its gateway URL and print that `curl` and its answer, and
keep serving until interrupted: Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all remove the service
and stop the hub, its controller and its gateway."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from examples.images import MODELSERVER_IMAGE, build_modelserver_image

PORT = int(os.environ.get("MMANAGER_DEMO_PORT", "8000"))
HUB = f"http://127.0.0.1:{PORT}"
STATE = Path(".mmanager")
CATALOG = Path(__file__).resolve().parents[1] / "modelserver" / "catalog.json"
# Everything else comes from the model type: image, resources, port, health check, golden probe.
SPEC = {"name": "dnabert2", "model": "dnabert2"}
PREDICT = {"sequence": "TTGACAATTAATCATCGGCTCGTATAATGTGTGGAATTGTGAGCGGATAACAATTTCACACAGGAAACAGCTATGACCATG",
           "task_type": "promoter_prediction"}


def say(message: str) -> None:
    # The terminal may be gone (SIGHUP): the cleanup that follows must not die of a print.
    with contextlib.suppress(OSError):
        print(f"==> {message}", flush=True)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does: a KeyboardInterrupt, so `main`'s cleanup runs."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)


def cleaning_up() -> None:
    """Once the cleanup runs, a second signal (a closing terminal's SIGHUP then SIGTERM, Ctrl-C pressed
    twice) must not cut it short and leave the hub or the container behind: each step is bounded."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def wait_for_hub(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mmanager dev exited with {proc.returncode}")
        try:
            if httpx.get(f"{HUB}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("the hub did not come up")


def wait_for_controller(api: httpx.Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        controllers = api.get("/api/admin/controllers").json()
        if any(c["status"] == "healthy" for c in controllers):
            return
        time.sleep(0.3)
    sys.exit("the local controller did not become healthy")


def wait_for_gateway_url(api: httpx.Client, service_id: str, timeout: float = 20) -> str:
    """The service's URL once the gateway serves it (`mmanager dev` runs one when HAProxy is installed);
    without a gateway, where its container answers."""
    deadline = time.monotonic() + timeout
    url = ""
    while time.monotonic() < deadline:
        url = api.get(f"/api/services/{service_id}").json()["url"] or ""
        if "/s/" in url:
            return url
        time.sleep(0.2)
    say("no gateway is running (is haproxy installed?): the container's own address instead")
    return url.rstrip("/") + "/"


def wait_for_answer(url: str, body: dict, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.post(url, json=body, timeout=30)
            if answer.status_code == 200 or time.monotonic() > deadline:
                return answer
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def register_models(api: httpx.Client) -> None:
    """The reference types, as an admin registers them (`mmanager models register -f` does the same)."""
    for entry in json.loads(CATALOG.read_text()):
        response = api.post("/api/admin/models", json=entry)
        if response.status_code == 409:
            response = api.put(f"/api/admin/models/{entry['name']}", json=entry)
        if response.status_code not in (200, 201):
            sys.exit(f"registering model type {entry['name']} failed: {response.status_code} {response.text}")
    say("model types: " + ", ".join(f"{m['name']} ({m['task']})" for m in api.get("/api/models").json()))


def deploy(api: httpx.Client) -> dict:
    for service in api.get("/api/services").json():
        if service["name"] == SPEC["name"]:
            say(f"removing the {SPEC['name']} service left from an earlier run ({service['id']})")
            api.delete(f"/api/services/{service['id']}").raise_for_status()
    response = api.post("/api/dev/demo/services", json=SPEC)
    if response.status_code != 201:
        sys.exit(f"create failed: {response.status_code} {response.text}")
    return response.json()


def main() -> None:
    stop_on_signals()
    say(f"building {MODELSERVER_IMAGE} locally (torch's CPU wheel; skipped when built before)")
    build_modelserver_image()
    say(f"starting `mmanager dev --port {PORT}`")
    # Its own session: Ctrl-C reaches only this script, which removes the service before stopping the hub.
    proc = subprocess.Popen([sys.executable, "-m", "mmanager.cli", "dev", "--port", str(PORT)], start_new_session=True)
    service_id = None
    api: httpx.Client | None = None
    try:
        wait_for_hub(proc)
        token = (STATE / "dev-token").read_text().strip()
        api = httpx.Client(base_url=HUB, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        wait_for_controller(api)
        register_models(api)
        say("deploying the dnabert2 model service from its type: POST /api/dev/demo/services "
            + json.dumps(SPEC))
        service = deploy(api)
        service_id = service["id"]
        status = api.get(f"/api/services/{service_id}/status").json()
        say(f"service {status['name']} ({service_id}) is {status['status']} on {status['controller_id']}, "
            f"container {status['container_id'][:12]}")
        url = wait_for_gateway_url(api, service_id)
        answer = wait_for_answer(f"{url}predict", PREDICT)
        say(f"its gateway URL {url} answers:")
        print(f"$ curl -s -X POST {url}predict -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(PREDICT))}")
        print(json.dumps(answer.json(), indent=2), flush=True)
        say(f"try: curl {url}model/info")
        say(f"     mmanager login {HUB} < {STATE / 'dev-token'} && mmanager services status {SPEC['name']}")
        say(f"     the console: {HUB}/ui (log in with the token in {STATE / 'dev-token'})")
        say("serving until Ctrl-C")
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cleaning_up()
        if api is not None and proc.poll() is None:
            try:
                # Interrupted while it was being created: it is found by its name.
                service_id = service_id or next((s["id"] for s in api.get("/api/services").json()
                                                 if s["name"] == SPEC["name"]), None)
                if service_id:
                    say(f"removing the {SPEC['name']} service")
                    api.delete(f"/api/services/{service_id}")
            except httpx.HTTPError as exc:
                with contextlib.suppress(OSError):
                    print(f"could not remove it: {exc}", file=sys.stderr)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # Its whole process group (its own session: the group is its pid, not reusable until it is
                # reaped), so that nothing it started outlives it.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


if __name__ == "__main__":
    main()
