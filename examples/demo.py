"""`make demo`: start `mmanager dev` (hub, controller and gateway), deploy the example model service
through the hub's HTTP API as a user would, show its gateway URL answering, and keep serving until
interrupted (Ctrl-C removes the example service and stops the hub)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from examples.images import EXAMPLE_IMAGE, build_example_image

PORT = int(os.environ.get("MMANAGER_DEMO_PORT", "8000"))
HUB = f"http://127.0.0.1:{PORT}"
STATE = Path(".mmanager")
SPEC = {
    "name": "example",
    "image": EXAMPLE_IMAGE,
    "ports": {"5000": None},
    "env": {"MODEL_NAME": "example"},
    "resources": {"cpu_limit": 0.5, "memory_limit": "128MB"},
    "health_check": {"path": "/health", "port": 5000, "interval": 5},
}


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


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


def wait_for_answer(url: str, timeout: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == 200 or time.monotonic() > deadline:
                return answer
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def deploy(api: httpx.Client) -> dict:
    for service in api.get("/api/services").json():
        if service["name"] == SPEC["name"]:
            say(f"removing the example service left from an earlier run ({service['id']})")
            api.delete(f"/api/services/{service['id']}").raise_for_status()
    response = api.post("/api/dev/examples/services", json=SPEC)
    if response.status_code != 201:
        sys.exit(f"create failed: {response.status_code} {response.text}")
    return response.json()


def main() -> None:
    say(f"building {EXAMPLE_IMAGE} locally (FROM scratch + static busybox)")
    build_example_image()
    say(f"starting `mmanager dev --port {PORT}`")
    # Its own session: Ctrl-C reaches only this script, which removes the example before stopping the hub.
    proc = subprocess.Popen([sys.executable, "-m", "mmanager.cli", "dev", "--port", str(PORT)], start_new_session=True)
    service_id = None
    try:
        wait_for_hub(proc)
        token = (STATE / "dev-token").read_text().strip()
        api = httpx.Client(base_url=HUB, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        wait_for_controller(api)
        say("deploying the example service: POST /api/dev/examples/services")
        service = deploy(api)
        service_id = service["id"]
        status = api.get(f"/api/services/{service_id}/status").json()
        say(f"service {status['name']} ({service_id}) is {status['status']} on {status['controller_id']}, "
            f"container {status['container_id'][:12]}")
        url = wait_for_gateway_url(api, service_id)
        answer = wait_for_answer(f"{url}health")
        say(f"its gateway URL {url} answers: GET {url}health -> {answer.status_code} {answer.text.strip()}")
        say(f"try: curl {url}model/info")
        say(f"     curl -H 'Authorization: Bearer {token}' {HUB}/api/services/{service_id}/status")
        say("serving until Ctrl-C")
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if service_id and proc.poll() is None:
            say("removing the example service")
            try:
                api.delete(f"/api/services/{service_id}")
            except httpx.HTTPError as exc:
                print(f"could not remove it: {exc}", file=sys.stderr)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
