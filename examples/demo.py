"""`make demo`: start `mmanager dev` (hub, controller and gateway), register the reference model types
(modelserver/catalog.json), deploy the DNABERT2-style model service from its type through the hub's HTTP
API as a user would, call `/predict` through its gateway URL and print that `curl` and its answer, and
keep serving until interrupted: Ctrl-C, SIGTERM and SIGHUP (the terminal closed) all remove the service
and stop the hub, its controller and its gateway, at any point of the run (while the image builds, the hub
starts or the service is made as well), once: the first of them starts the cleanup, and any after it
(a closing terminal's second SIGHUP, Ctrl-C pressed twice) is ignored, so it cannot cut the cleanup short.
Each cleanup step is bounded and runs whether the one before it failed or not."""

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

import docker
import httpx

from examples.images import MODELSERVER_IMAGE, build_modelserver_image
from mmanager.wire import LABEL_CONTROLLER, LABEL_MANAGED

PORT = int(os.environ.get("MMANAGER_DEMO_PORT", "8000"))
HUB = f"http://127.0.0.1:{PORT}"
STATE = Path(".mmanager")
CATALOG = Path(__file__).resolve().parents[1] / "modelserver" / "catalog.json"
# Everything else comes from the model type: image, resources, port, health check, golden probe.
SPEC = {"name": "dnabert2", "model": "dnabert2"}
PREDICT = {"sequence": "TTGACAATTAATCATCGGCTCGTATAATGTGTGGAATTGTGAGCGGATAACAATTTCACACAGGAAACAGCTATGACCATG",
           "task_type": "promoter_prediction"}
# The cleanup's bounds, with signals ignored: each call to the hub or Docker, and all of it but stopping
# `mmanager dev` (its own bound: 15 s, then SIGKILL to its process group).
CLEANUP_CALL_TIMEOUT = 10.0
CLEANUP_DEADLINE = 30.0
# A stop signal that came while `mmanager dev` was being started (None: not starting it now): raised once its
# Popen is known to the cleanup, so that no signal leaves it running unseen.
_held: list[int] | None = None


def say(message: str) -> None:
    # The terminal may be gone (SIGHUP): the cleanup that follows must not die of a print.
    with contextlib.suppress(OSError):
        print(f"==> {message}", flush=True)


def _interrupted(signum: int, frame: Any) -> None:
    # Ignored first, then raised: a second signal, however soon, finds the cleanup already safe from it.
    cleaning_up()
    if _held is not None:
        _held.append(signum)
        return
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP stop the demo alike: a KeyboardInterrupt, so `main`'s cleanup runs, once."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)


def cleaning_up() -> None:
    """Once the cleanup starts, a second signal (a closing terminal's SIGHUP then SIGTERM, Ctrl-C pressed
    twice) must not cut it short and leave the hub or the container behind: each step is bounded."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def start_dev() -> subprocess.Popen[bytes]:
    """`mmanager dev` in its own session: Ctrl-C reaches only this script, which removes the service before
    stopping the hub. A signal while it starts is held until ``proc`` is known, then raised."""
    global _held
    _held = []
    try:
        return subprocess.Popen([sys.executable, "-m", "mmanager.cli", "dev", "--port", str(PORT)],
                                start_new_session=True)
    except BaseException:
        _held = None
        raise


def release_signals() -> None:
    global _held
    held, _held = _held, None
    if held:
        raise KeyboardInterrupt


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


def wait_for_controller(api: httpx.Client, timeout: float = 30) -> str:
    """The id of the hub's local controller, once healthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        controllers = api.get("/api/admin/controllers").json()
        healthy = [c["id"] for c in controllers if c["status"] == "healthy"]
        if healthy:
            return healthy[0]
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


class Run:
    """What the demo started, for the cleanup: each set as soon as it exists."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.api: httpx.Client | None = None
        self.controller_id: str | None = None
        self.service_id: str | None = None
        # The create was sent: its service (and container) may exist although its answer never came.
        self.deploying_since: str | None = None


def main() -> None:
    stop_on_signals()
    run = Run()
    try:
        say(f"building {MODELSERVER_IMAGE} locally (torch's CPU wheel; skipped when built before)")
        build_modelserver_image()
        say(f"starting `mmanager dev --port {PORT}`")
        run.proc = start_dev()
        release_signals()
        serve(run, run.proc)
    except KeyboardInterrupt:
        pass
    finally:
        cleaning_up()
        clean_up(run)


def serve(run: Run, proc: subprocess.Popen[bytes]) -> None:
    wait_for_hub(proc)
    token = (STATE / "dev-token").read_text().strip()
    api = run.api = httpx.Client(base_url=HUB, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    run.controller_id = wait_for_controller(api)
    register_models(api)
    say("deploying the dnabert2 model service from its type: POST /api/dev/demo/services " + json.dumps(SPEC))
    # Docker's clock, in its Created's form, to the second: the containers the create may have made are newer.
    run.deploying_since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    service = deploy(api)
    service_id = run.service_id = service["id"]
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


def clean_up(run: Run) -> None:
    """Remove the service, stop `mmanager dev`, then remove what the create made unseen: each step runs
    whatever the one before it did, and each is bounded (signals are ignored by now)."""
    deadline = time.monotonic() + CLEANUP_DEADLINE
    proc = run.proc
    try:
        if run.api is not None and proc is not None and proc.poll() is None:
            try:
                remove_service(run, run.api, deadline)
            except Exception as exc:  # a 503, an answer that is not JSON, a timeout: the next steps still run
                warn(f"could not remove the {SPEC['name']} service: {exc!r}")
    finally:
        try:
            if proc is not None:
                stop_dev(proc)
        finally:
            if run.deploying_since is not None and run.controller_id is not None:
                try:
                    remove_unseen_containers(run.controller_id, run.deploying_since, run.service_id, deadline)
                except Exception as exc:
                    warn(f"could not look for the {SPEC['name']} service's containers: {exc!r}")


def _left(deadline: float) -> float:
    return max(min(CLEANUP_CALL_TIMEOUT, deadline - time.monotonic()), 0.1)


def remove_service(run: Run, api: httpx.Client, deadline: float) -> None:
    # Interrupted while it was being created: it is found by its name.
    service_id = run.service_id
    if service_id is None:
        listed = api.get("/api/services", timeout=_left(deadline))
        listed.raise_for_status()
        service_id = next((s["id"] for s in listed.json() if s["name"] == SPEC["name"]), None)
    if service_id:
        say(f"removing the {SPEC['name']} service")
        api.delete(f"/api/services/{service_id}", timeout=_left(deadline)).raise_for_status()
        run.service_id = service_id


def stop_dev(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            # Its whole process group (its own session: the group is its pid, not reusable until it is
            # reaped), so that nothing it started outlives it.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def remove_unseen_containers(controller_id: str, since: str, service_id: str | None, deadline: float) -> None:
    """Interrupted while the service was being made, its row may commit after the cleanup looked for it, and
    its container start with nobody to remove it. Once `mmanager dev` is stopped (nothing more is made):
    the containers of this demo's service, as its controller names them (``mm-<name>-<id[:8]>-…``, labelled
    with that controller's id), made since the create was sent. Never another's: every other name, older
    container or controller's label is left alone."""
    client = docker.from_env(timeout=int(_left(deadline)) or 1)
    try:
        prefix = f"mm-{SPEC['name']}-" + (f"{service_id[:8]}-" if service_id else "")
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_CONTROLLER}={controller_id}"]
        for container in client.containers.list(all=True, filters={"label": labels}):
            if (container.name or "").startswith(prefix) and container.attrs.get("Created", "") >= since:
                say(f"removing its container {container.name}, made as the demo was interrupted")
                container.remove(force=True)
    finally:
        client.close()


def warn(message: str) -> None:
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
