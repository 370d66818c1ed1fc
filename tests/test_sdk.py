"""The SDK (mmanager.client) against a real lab: the hub, two controllers and a gateway as real processes on
real PostgreSQL and the real Docker engine, the reference model service deployed from the catalog. One user
story: deploy with progress, predict through the gateway, status, follow the logs, scale, bad input refused
with the hub's code and nothing changed, another user's service not found, the async client, a service key,
a model file uploaded and deleted, a controller's images, delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from hub.schemas import OperationOut
from mmanager.client import HUB_UNREACHABLE, ApiError, AsyncClient, Client
from tests.support.lab import Lab, running_lab
from tests.support.net import free_port
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import running_copies

ROOT = Path(__file__).resolve().parents[1]
DNABERT2 = next(e for e in json.loads((ROOT / "modelserver/catalog.json").read_text()) if e["name"] == "dnabert2")
SEQUENCE = "TTGACAATTAATCATCGGCTCGTATAATGTGTGGAATTGTGAGCGGATAACAATTTCACACAGGAAACAGCTATGACCATG"


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "sdk")


@pytest.fixture
def lab(db_url: str, modelserver_image: str, docker_client: docker.DockerClient, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(db_url, tmp_path, request, docker_client) as lab:
        with lab.hub() as client:
            assert client.post("/api/admin/models", json=DNABERT2).status_code == 201
        yield lab


def first_line(lines: Iterator[str], wanted: str, timeout: float) -> str:
    """The first of ``lines`` that holds ``wanted``, read on a thread so that a silent stream fails the test
    instead of hanging it."""
    found: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in lines:
            if wanted in line:
                found.put(line)
                return

    threading.Thread(target=read, daemon=True).start()
    return found.get(timeout=timeout)


def test_the_sdk_deploys_predicts_follows_scales_and_deletes(lab: Lab, docker_client: docker.DockerClient,
                                                             tmp_path: Path) -> None:
    hub = lab.dep.hub().url
    with lab.hub() as admin:
        tokens = {name: admin.post("/api/admin/users", json={"username": name}).json()["token"]
                  for name in ("alice", "bob")}
    alice = lab.client(tokens["alice"])
    assert alice.me().username == "alice" and not alice.me().admin

    polls: list[OperationOut] = []
    svc = alice.deploy(model="dnabert2", progress=polls.append)
    # Ended at the golden-inference probe's verdict, as the hub's own wait=true would.
    assert (svc.info.status, svc.info.health, svc.name) == ("running", "healthy", "dnabert2")
    assert polls and polls[-1].status == "succeeded" and polls[-1].operation == "create"

    # Predictions through the gateway, once it routes the new service.
    svc = wait_until(lambda: (s := alice.service("dnabert2")).url and s.url.startswith(lab.gateway) and s, 20,
                     "the service's gateway URL")
    # The deploy ended where the hub's own wait does, at the probe's verdict: the first prediction is served.
    one = svc.predict(SEQUENCE)
    assert 0.0 <= one["prediction"] <= 1.0 and one["sequence_length"] == len(SEQUENCE)
    assert [p["sequence_length"] for p in svc.predict_batch([SEQUENCE, SEQUENCE[:40], SEQUENCE[:20]], chunk=2)] \
        == [len(SEQUENCE), 40, 20]
    assert svc.predict([SEQUENCE])[0]["prediction"] == one["prediction"]

    # Status, and the logs followed: the line the model service printed when it began serving.
    assert alice.services.status("dnabert2").replicas[0].state == "running"
    followed = svc.logs(follow=True)
    assert "serving DNABERT2" in first_line(followed, "serving DNABERT2", 30)
    followed.close()
    assert "serving DNABERT2" in svc.logs()

    scaled: list[OperationOut] = []
    out = svc.scale(2, progress=scaled.append)
    assert len(out.replicas) == 2 and scaled[-1].status == "succeeded"
    assert scaled[-1].details["progress"] == {"done": 1, "total": 1, "unit": "replicas", "step": "2 replicas running"}
    assert len(running_copies(docker_client, svc.id)) == 2

    # Bad input: the hub's code, and nothing changed.
    before = alice.services.get(svc.id)
    for bad, code in ((lambda: svc.scale(0), "VALIDATION_ERROR"),
                      (lambda: alice.services.update("dnabert2", {"no_such_field": 1}), "VALIDATION_ERROR"),
                      (lambda: alice.services.create({"name": "bad name!", "image": "x"}), "VALIDATION_ERROR"),
                      (lambda: alice.services.rollback("dnabert2", 99), "VERSION_NOT_FOUND"),
                      (lambda: alice.services.get("nothing-here"), "SERVICE_NOT_FOUND"),
                      (lambda: alice.services.migrate("dnabert2"), "ADMIN_REQUIRED")):
        with pytest.raises(ApiError) as caught:
            bad()
        assert caught.value.code == code and 400 <= caught.value.status < 500, caught.value
    after = alice.services.get(svc.id)
    assert (after.version, len(after.replicas), [s.name for s in alice.services.list()]) == \
        (before.version, 2, ["dnabert2"])

    bob = lab.client(tokens["bob"])
    with pytest.raises(ApiError) as caught:
        bob.services.get(svc.id)
    assert (caught.value.status, caught.value.code) == (404, "SERVICE_NOT_FOUND")
    assert bob.operations.list() == [] and bob.services.list() == []
    assert {o.operation for o in alice.operations.list(service_id=svc.id)} >= {"create", "scale"}

    async def from_async() -> tuple[str, list[str]]:
        async with AsyncClient(url=hub, token=tokens["alice"]) as c:
            status = await c.services.status("dnabert2")
            lines = c.services.follow_logs(status.id, tail=50)
            async for line in lines:
                if "serving DNABERT2" in line:
                    break
            await lines.aclose()
            return status.status, [e.path for e in await c.audit.list(method="PATCH")]

    status, patched = asyncio.run(asyncio.wait_for(from_async(), 30))
    assert status == "running" and patched and set(patched) == {f"/api/services/{svc.id}"}

    # A service key: shown once, listed by its prefix only, another user's service's keys not found, revoked.
    key = alice.services.keys.create("dnabert2", name="ci")
    assert key.key.startswith(key.prefix) and [(k.id, k.name) for k in alice.services.keys.list("dnabert2")] \
        == [(key.id, "ci")]
    with pytest.raises(ApiError) as caught:
        bob.services.keys.list(svc.id)
    assert caught.value.code == "SERVICE_NOT_FOUND"
    alice.services.keys.delete("dnabert2", key.id)
    assert alice.services.keys.list("dnabert2") == []

    # A model file: streamed up with its progress, listed, found by digest, deleted.
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x00\x01" * 1000)
    sent: list[tuple[int, int]] = []
    stored = alice.model_files.upload(weights, name="weights.bin", progress=lambda d, t: sent.append((d, t)))
    assert (stored.name, stored.size, stored.uploaded_by, sent[-1]) == ("weights.bin", 2000, "alice", (2000, 2000))
    assert stored.digest == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert [f.digest for f in bob.model_files.list()] == [stored.digest] and alice.model_files.get(stored.digest) == stored
    alice.model_files.delete(stored.digest)
    assert alice.model_files.list() == []

    # An admin lists a controller's images: the model service's is there.
    with lab.client(lab.token) as root:
        listed = root.images.list(sorted(lab.dep.controllers)[0])
    assert listed.ok and any(f"{i['repository']}:{i['tag']}" == DNABERT2["image"] for i in listed.images), listed

    svc.delete()
    with pytest.raises(ApiError) as caught:
        svc.refresh()
    assert caught.value.code == "SERVICE_NOT_FOUND"
    assert running_copies(docker_client, svc.id) == []

    with pytest.raises(ApiError) as caught:
        Client(url=f"http://127.0.0.1:{free_port()}", token="x").me()
    assert (caught.value.status, caught.value.code) == (0, HUB_UNREACHABLE)
    for c in (alice, bob):
        c.close()
