"""A pipeline run end to end as a user runs one: the hub, two controllers and PostgreSQL as real processes, the
steps as real containers. Three steps pass their outputs along; a step that fails is retried without running the
step before it again, and the pipeline's outputs are downloaded; a pipeline cancelled while a step runs stops its
container."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from examples.images import EXAMPLE_IMAGE
from tests.support.lab import Lab, running_lab
from tests.support.pg import create_database
from tests.support.poll import wait_until


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "pipelines")


@pytest.fixture
def lab(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(db_url, tmp_path, request, docker_client) as lab:
        yield lab


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def ended(hub: httpx.Client, pid: str) -> dict[str, Any] | None:
    p = hub.get(f"/api/pipelines/{pid}").json()
    return p if p["status"] in ("succeeded", "failed", "cancelled") else None


def test_a_three_step_pipeline_passes_outputs_a_failed_step_is_retried_alone_and_cancel_stops_it(
        lab: Lab, docker_client: docker.DockerClient) -> None:
    created = lab.hub().post("/api/admin/users", json={"username": "alice"})
    assert created.status_code == 201, created.text
    hub = httpx.Client(base_url=lab.dep.hub().url, headers={"Authorization": f"Bearer {created.json()['token']}"},
                       timeout=30)
    r = hub.post("/api/artifacts", params={"name": "records.tsv"}, content=b"id\tseq\n1\tacgt\n2\tggcc\n",
                 headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    data = r.json()["id"]
    spec = {"name": "chain", "steps": [
        {"name": "upper", "image": EXAMPLE_IMAGE, "inputs": [data],
         "command": sh("tail -n +2 /inputs/records.tsv | tr a-z A-Z > /outputs/records.txt")},
        # Fails its first attempt: the retry of the pipeline runs it again as a new attempt.
        {"name": "count", "image": EXAMPLE_IMAGE, "inputs": [{"step": "upper", "path": "records.txt"}],
         "command": sh('[ "$MMANAGER_ATTEMPT" != 1 ] || exit 3; wc -l < /inputs/records.txt > /outputs/n')},
        {"name": "report", "image": EXAMPLE_IMAGE,
         "inputs": [{"step": "upper", "path": "records.txt", "as": "in/records.txt"},
                    {"step": "count", "path": "n"}],
         "command": sh("mkdir -p /outputs/out && cat /inputs/n /inputs/in/records.txt > /outputs/out/report.txt")},
    ]}
    r = hub.post("/api/pipelines", json=spec)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]

    failed = wait_until(lambda: ended(hub, pid), 90, "the pipeline's first run to end")
    steps = {j["step"]: j for j in failed["steps"]}
    assert failed["status"] == "failed", failed
    assert (steps["upper"]["status"], steps["count"]["status"], steps["report"]["status"]) == (
        "succeeded", "failed", "cancelled")
    assert steps["count"]["exit_code"] == 3 and steps["report"]["attempts"] == []

    r = hub.post(f"/api/pipelines/{pid}/retry")
    assert r.status_code == 200, r.text
    done = wait_until(lambda: ended(hub, pid), 90, "the retried pipeline to end")
    assert done["status"] == "succeeded", done
    steps = {j["step"]: j for j in done["steps"]}
    # The step before the failure ran once; the failed one twice.
    assert [a["status"] for a in steps["upper"]["attempts"]] == ["succeeded"]
    assert [a["status"] for a in steps["count"]["attempts"]] == ["failed", "succeeded"]
    assert [a["status"] for a in steps["report"]["attempts"]] == ["succeeded"]

    [report] = hub.get(f"/api/jobs/{steps['report']['id']}/artifacts").json()
    assert report["path"] == "out/report.txt"
    assert hub.get(report["url"]).text == "2\n1\tACGT\n2\tGGCC\n"
    assert hub.post(f"/api/pipelines/{pid}/retry").json()["error"]["code"] == "NOTHING_TO_RETRY"

    # Cancelled while a step runs: its container is stopped, the step after it never starts.
    r = hub.post("/api/pipelines", json={"name": "long", "steps": [
        {"name": "wait", "image": EXAMPLE_IMAGE, "command": sh("sleep 600")},
        {"name": "after", "image": EXAMPLE_IMAGE, "needs": ["wait"], "command": sh("true")}]})
    assert r.status_code == 201, r.text
    long = r.json()
    wait_id = long["steps"][0]["id"]
    wait_until(lambda: hub.get(f"/api/jobs/{wait_id}").json()["status"] == "running", 60, "the long step running")
    r = hub.post(f"/api/pipelines/{long['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert [j["status"] for j in r.json()["steps"]] == ["cancelled", "cancelled"]
    wait_until(lambda: not docker_client.containers.list(filters={"label": f"mmanager.job={wait_id}"}), 60,
               "the cancelled step's container stopped")
    attempt = wait_until(lambda: [a for a in hub.get(f"/api/jobs/{wait_id}").json()["attempts"]
                                  if a["status"] not in ("starting", "running")], 60, "the attempt ended")
    assert attempt[0]["status"] == "cancelled"

