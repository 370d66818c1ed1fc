"""LOG_LEVEL, LOG_FILE and LOG_FORMAT=json on real hub and controller processes, and one request
followed across both by its X-Request-ID."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from examples.images import EXAMPLE_IMAGE
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import MMANAGER, LocalDeployment, api, stopped_after

SPEC = {"image": EXAMPLE_IMAGE, "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "logs")


@pytest.fixture
def deployment(db_url: str, docker_client: docker.DockerClient, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[LocalDeployment]:
    dep = LocalDeployment(db_url, tmp_path)
    with stopped_after(dep, request, docker_client):
        yield dep


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` as JSON: one that is not fails the test."""
    lines = path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    return entries


def test_one_request_is_found_on_hub_and_controller_by_its_id(
        deployment: LocalDeployment, example_image: str, tmp_path: Path) -> None:
    hub_log, ctl_log = tmp_path / "logs" / "hub.jsonl", tmp_path / "logs" / "controller.jsonl"
    deployment.extra_hub_env.update({"LOG_FORMAT": "json", "LOG_FILE": str(hub_log), "LOG_LEVEL": "INFO"})
    deployment.plan_hubs(1)
    controller = deployment.add_controller("logs")
    controller.env.update({"MMANAGER_LOG_FORMAT": "json", "LOG_FILE": str(ctl_log)})
    token = deployment.create_admin()
    deployment.start()
    client = api(deployment.hub().url, token)
    wait_until(lambda: client.get("/api/admin/controllers").json()[0]["status"] == "healthy", 20,
               what="the controller healthy")

    created = client.post("/api/root/lab/services", json={**SPEC, "name": "traced"},
                          headers={"X-Request-ID": "abc123"})
    assert created.status_code == 201, created.text
    assert created.headers["X-Request-ID"] == "abc123"
    # An id that is no fit for a log line is replaced, never echoed.
    junk = "x" * 1024
    listed = client.get("/api/services", headers={"X-Request-ID": junk})
    assert listed.status_code == 200
    fresh = listed.headers["X-Request-ID"]
    assert fresh != junk and 0 < len(fresh) <= 128

    def traced(path: Path) -> list[dict[str, Any]]:
        return [e for e in json_lines(path) if e.get("request_id") == "abc123"] if path.exists() else []

    # The access lines are written once the answers are sent: wait for them rather than race.
    hub_lines = wait_until(lambda: len(traced(hub_log)) >= 2 and traced(hub_log), 10, what="the hub's lines of abc123")
    ctl_lines = wait_until(lambda: traced(ctl_log), 10, what="the controller's lines of abc123")
    hub_text = "\n".join(e["message"] for e in hub_lines)
    assert "POST /api/root/lab/services" in hub_text, hub_text
    assert "operation create" in hub_text and created.json()["id"] in hub_text, hub_text
    ctl_text = "\n".join(e["message"] for e in ctl_lines)
    assert "POST /containers" in ctl_text, ctl_text
    assert created.json()["id"] in ctl_text, ctl_text  # "created container … for service <id>"
    assert {e["logger"] for e in ctl_lines} >= {"mmanager.access", "controller.containers"}

    hub_all = json_lines(hub_log)
    assert any(e["level"] == "INFO" and e["logger"].startswith("uvicorn") for e in hub_all)
    assert any(e.get("request_id") == fresh for e in hub_all)
    assert not any(junk in line for line in (hub_log.read_text() + ctl_log.read_text()).splitlines())
    # No secret anywhere: not the user's token, not the hub↔controller key, not in stdout either.
    everything = "\n".join(p.read_text() for p in (hub_log, ctl_log, controller.log, deployment.hub().log))
    for secret in (token, deployment.key):
        assert secret not in everything
    assert "Bearer" not in everything


def test_log_level_warning_drops_info_lines(deployment: LocalDeployment, tmp_path: Path) -> None:
    hub_log, ctl_log = tmp_path / "hub.jsonl", tmp_path / "controller.jsonl"
    deployment.extra_hub_env.update({"MMANAGER_LOG_LEVEL": "WARNING", "LOG_FORMAT": "json", "LOG_FILE": str(hub_log)})
    deployment.plan_hubs(1)
    # A controller whose Docker is unreachable, and which heartbeats with the shared key: both processes
    # have something to warn about.
    controller = deployment.add_controller("quiet")
    controller.env.update({"LOG_LEVEL": "WARNING", "LOG_FORMAT": "json", "LOG_FILE": str(ctl_log),
                           "DOCKER_HOST": "tcp://127.0.0.1:9", "DOCKER_TIMEOUT": "2"})
    token = deployment.create_admin()
    deployment.start()
    client = api(deployment.hub().url, token)
    assert client.get("/api/services").status_code == 200
    assert client.get("/api/services/nope").status_code == 404
    wait_until(lambda: "shared MMANAGER_API_KEY" in hub_log.read_text(), 10, what="the hub's warning")
    deployment.stop()
    # Start-up, served requests, heartbeats and shutdown all log at INFO: none of it is here.
    hub_entries, ctl_entries = json_lines(hub_log), json_lines(ctl_log)
    assert any(e["level"] == "WARNING" and "shared MMANAGER_API_KEY" in e["message"] for e in hub_entries)
    assert any(e["level"] == "WARNING" and "Docker is unreachable" in e["message"] for e in ctl_entries), ctl_entries
    assert [e for e in hub_entries + ctl_entries if e["level"] in ("DEBUG", "INFO")] == []


@pytest.mark.parametrize("command", [["hub", "serve"], ["controller", "serve"]])
def test_a_log_file_that_cannot_be_opened_stops_start_up(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    env = {**os.environ, "LOG_FILE": str(tmp_path / "not-a-dir" / "mm.log"),
           "MMANAGER_API_KEY": uuid.uuid4().hex * 2, "MMANAGER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/x.db"}
    done = subprocess.run([*MMANAGER, *command, "--port", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "LOG_FILE" in done.stderr and "not-a-dir" in done.stderr, done.stderr
