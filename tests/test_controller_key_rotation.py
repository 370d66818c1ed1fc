"""A controller's key rotated with real processes (a hub, a controller, the
``mmanager`` command) on real PostgreSQL, at a 0.5 s heartbeat: the key file is
rewritten under the running controller, the old key revoked, and not one
heartbeat fails; the revoked key is refused at once."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import httpx
import pytest

from tests.hub.test_failure_handling import heartbeat
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import MMANAGER, LocalDeployment, api, stopped_after

INTERVAL = 0.5


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "rot")


@pytest.fixture
def deployment(db_url: str, docker_client: docker.DockerClient, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[LocalDeployment]:
    dep = LocalDeployment(db_url, tmp_path, interval=INTERVAL, grace=3.0)
    with stopped_after(dep, request, docker_client):
        yield dep


def mmanager(dep: LocalDeployment, *args: str) -> str:
    """Run the command on the hub host, as an operator would; its standard output."""
    done = subprocess.run([*MMANAGER, *args], env={**os.environ, **dep.hub_env}, capture_output=True, text=True,
                          check=True)
    return done.stdout


def write_key(path: Path, key: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(key + "\n")
    os.replace(tmp, path)


def heartbeat_failures(controller_url: str) -> float:
    text = httpx.get(controller_url + "/metrics").text
    found = re.search(r"^mmanager_heartbeat_failures_total\{[^}]*\} (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def test_a_key_rotates_without_a_failed_heartbeat(deployment: LocalDeployment, tmp_path: Path) -> None:
    dep = deployment
    dep.plan_hubs(1)
    ctl = dep.add_controller("rot")
    cid = ctl.name
    client = api(dep.hub(0).url, dep.create_admin())
    dep.hub(0).start().wait_listening(30)

    def keys() -> dict[str, dict[str, str | None]]:
        return {k["id"]: k for k in client.get(f"/api/admin/controllers/{cid}/keys").json()}

    # Key A is bootstrapped on the hub host; the controller starts with it in its key file.
    key_a = mmanager(dep, "controllers", "key-create", cid).strip().splitlines()[-1]
    [a_id] = keys()
    key_file = tmp_path / "controller.key"
    write_key(key_file, key_a)
    ctl.env["MMANAGER_CONTROLLER_KEY_FILE"] = str(key_file)
    ctl.start().wait_listening()
    wait_until(lambda: keys()[a_id]["last_used_at"], 15, what="heartbeats with key A")

    # Rotation: add B, switch the controller by rewriting its file, let a few beats go, revoke A.
    created = client.post(f"/api/admin/controllers/{cid}/keys")
    assert created.status_code == 201, created.text
    b_id, key_b = created.json()["id"], created.json()["key"]
    write_key(key_file, key_b)
    wait_until(lambda: keys()[b_id]["last_used_at"], 10, what="heartbeats with key B")
    time.sleep(4 * INTERVAL)
    assert client.delete(f"/api/admin/controllers/{cid}/keys/{a_id}").status_code == 204
    revoked_at = datetime.now(UTC)

    # At once (the 204 came after the commit): a heartbeat with A is refused.
    r = httpx.post(f"{dep.hub(0).url}/api/controllers/{cid}/heartbeat", json=heartbeat(cid, []),
                   headers={"Authorization": f"Bearer {key_a}"})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "CONTROLLER_KEY_INVALID")

    def beats_after_revoke() -> bool:
        controller = client.get(f"/api/admin/controllers/{cid}").json()
        heard = datetime.fromisoformat(controller["last_heartbeat_at"])
        return controller["status"] == "healthy" and heard > revoked_at + timedelta(seconds=4 * INTERVAL)

    wait_until(beats_after_revoke, 10, what="heartbeats well after the revoke")
    assert heartbeat_failures(ctl.url) == 0
    controller_log = ctl.log.read_text()
    assert not re.search(r"heartbeat to \S+ failed", controller_log), controller_log[-2000:]
    assert "heartbeats now carry the new key" in controller_log

    everything = client.get(f"/api/admin/controllers/{cid}/keys").text + controller_log + dep.hub(0).log.read_text()
    assert key_a not in everything and key_b not in everything
    states = {k: v["revoked_at"] is not None for k, v in keys().items()}
    assert states == {a_id: True, b_id: False}
