"""The reference model service deployed by the hub, as a lab runs it: the hub, two controllers and a
gateway as real processes on real PostgreSQL and the real Docker engine, the model types registered from
modelserver/catalog.json, services created from them, and predictions called through the gateway. The
answers stay the same across restarts and moves; a copy with wrong weights is caught by its
golden-inference probe where its ``/health`` passes."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.support.lab import Lab, running_lab
from tests.support.pg import create_database
from tests.support.poll import wait_until

ROOT = Path(__file__).resolve().parents[1]
CATALOG = json.loads((ROOT / "modelserver/catalog.json").read_text())
WRONG_WEIGHTS = "mmanager/modelserver:wrong-weights-test"
# What a client sends: a promoter-length sequence that is not the probe's.
SEQUENCE = "TTGACAATTAATCATCGGCTCGTATAATGTGTGGAATTGTGAGCGGATAACAATTTCACACAGGAAACAGCTATGACCATG"


@pytest.fixture(scope="module")
def wrong_weights_image(modelserver_image: str, docker_client: docker.DockerClient) -> str:
    """The reference image with weights made from another seed: a valid model that computes other numbers."""
    dockerfile = (f"FROM {modelserver_image}\nUSER root\n"
                  "RUN python -m modelserver.weights --out /opt/modelserver/models --seed 7\nUSER modelserver\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile.encode()))
    buf.seek(0)
    docker_client.images.build(fileobj=buf, custom_context=True, tag=WRONG_WEIGHTS, rm=True)
    return WRONG_WEIGHTS


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "models")


@pytest.fixture
def lab(db_url: str, modelserver_image: str, docker_client: docker.DockerClient, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(db_url, tmp_path, request, docker_client) as lab:
        with lab.hub() as client:
            for entry in CATALOG:
                registered = client.post("/api/admin/models", json=entry)
                assert registered.status_code == 201, registered.text
        yield lab


def create(lab: Lab, name: str, model: str, **spec: Any) -> dict[str, Any]:
    with lab.hub() as client:
        created = client.post("/api/root/lab/services", json={"name": name, "model": model, **spec})
        assert created.status_code == 201, created.text
        service = created.json()
        return wait_until(lambda: _if(client.get(f"/api/services/{service['id']}").json(),
                                      lambda s: s["url"].startswith(lab.gateway)), 20, "the service's gateway URL")


def _if(value: Any, check: Any) -> Any:
    return value if check(value) else None


def predict(url: str, body: dict[str, Any]) -> dict[str, Any]:
    def answered() -> dict[str, Any] | None:
        response = httpx.post(url + "predict", json=body, timeout=30)
        return response.json() if response.status_code == 200 else None

    return wait_until(answered, 60, f"a prediction through {url}")


def test_the_catalog_lists_the_reference_types_with_their_probes(lab: Lab) -> None:
    with lab.hub() as client:
        models = {m["name"]: m for m in client.get("/api/models").json()}
    assert set(models) == {entry["name"] for entry in CATALOG}
    for entry in CATALOG:
        assert models[entry["name"]]["image"] == "mmanager/modelserver:latest"
        assert models[entry["name"]]["probe"] == entry["probe"]


def test_a_prediction_through_the_gateway_is_the_same_after_a_restart_and_a_move(lab: Lab) -> None:
    service = create(lab, "promoters", "dnabert2")
    assert service["spec"]["model"] == "dnabert2" and service["health"] == "healthy"
    body = {"sequence": SEQUENCE, "task_type": "promoter_prediction"}
    first = predict(service["url"], body)
    assert first["success"] is True and first["request_id"]
    assert 0.0 <= first["data"]["prediction"] <= 1.0 and first["data"]["sequence_length"] == len(SEQUENCE)
    # The probe's own input, through the gateway, gives what the catalog expects.
    probe = CATALOG[[e["name"] for e in CATALOG].index("dnabert2")]["probe"]
    golden = predict(service["url"], probe["body"])
    assert abs(golden["data"]["prediction"] - probe["expect"]["data"]["prediction"]) <= probe["tolerance"]

    with lab.hub() as client:
        restarted = client.post(f"/api/services/{service['id']}/restart")
        assert restarted.status_code == 200, restarted.text
    assert predict(service["url"], body)["data"] == {**first["data"], "processing_time": _any_time}

    target = next(c for c in lab.dep.controllers if c != service["controller_id"])
    with lab.hub() as client:
        [entry] = client.get("/api/admin/containers", params={"service_id": service["id"]}).json()
        moved = client.post(f"/api/admin/containers/{entry['id']}/migrate", json={"target_controller": target})
        assert moved.status_code == 200, moved.text
        assert moved.json()["controller_id"] == target and moved.json()["health"] == "healthy"
    assert predict(service["url"], body)["data"] == {**first["data"], "processing_time": _any_time}


class _AnyTime:
    """Equal to any processing time: it is the one field of an answer that differs between calls."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and other >= 0

    def __repr__(self) -> str:
        return "<any processing_time>"


_any_time = _AnyTime()


def test_an_update_to_wrong_weights_is_caught_by_the_probe_and_the_old_copy_serves(
        lab: Lab, wrong_weights_image: str) -> None:
    service = create(lab, "promoters", "dnabert2")
    body = {"sequence": SEQUENCE, "task_type": "promoter_prediction"}
    before = predict(service["url"], body)["data"]["prediction"]
    with lab.hub() as client:
        update = client.patch(f"/api/services/{service['id']}", json={"image": wrong_weights_image})
        assert update.status_code == 409, update.text
        error = update.json()["error"]
        assert error["code"] == "PROBE_FAILED" and "data.prediction" in json.dumps(error["details"]), error
        status = client.get(f"/api/services/{service['id']}/status").json()
        assert status["spec"]["image"] == "mmanager/modelserver:latest" and status["health"] == "healthy"
        [operation] = client.get("/api/admin/operations",
                                 params={"service_id": service["id"], "operation": "update"}).json()
    assert operation["status"] == "failed" and "probe /predict: data.prediction" in operation["error"], operation
    assert predict(service["url"], body)["data"]["prediction"] == before


def test_a_service_with_wrong_weights_never_enters_the_gateway(lab: Lab, wrong_weights_image: str,
                                                             docker_client: docker.DockerClient) -> None:
    with lab.hub() as client:
        created = client.post("/api/root/lab/services", params={"wait": "false"},
                              json={"name": "garbage", "model": "dnabert2", "image": wrong_weights_image})
        assert created.status_code == 202, created.text
        service = {"id": created.json()["service_id"]}
        status = wait_until(lambda: _if(client.get(f"/api/services/{service['id']}/status").json(),
                                        lambda s: s["health"] == "unhealthy"), 60, "the probe's verdict")
    assert status["health_detail"].startswith("probe /predict: data."), status["health_detail"]
    [replica] = status["replicas"]
    assert replica["health"] == "unhealthy" and replica["health_detail"] == status["health_detail"]
    # Its container is up and its /health passes: only the probe tells it computes garbage.
    port = replica["endpoint"]["ports"]["8000"]
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    with lab.hub() as client:
        route = next(r for r in client.get("/api/gateway/routes").json()["services"] if r["id"] == service["id"])
    assert route["replicas"] == [], route
    # A client's call through the gateway is not sent to it, nor held for it (nothing will restart or move
    # a copy whose probe failed): 503 at once. The container answered the probe's call and nothing else.
    answer = httpx.post(f"{lab.gateway}/s/root/garbage/predict", json={"sequence": SEQUENCE}, timeout=10)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "SERVICE_UNAVAILABLE", answer.text
    # Well under the hold (5 s) a request would wait for a copy on its way.
    assert answer.elapsed.total_seconds() < 2.5, answer.elapsed
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/json"}, timeout=5).json()
    assert metrics["data"]["model_metrics"]["total_requests"] == 1, metrics
