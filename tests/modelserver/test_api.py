"""Seed 000's API contract on the real app over HTTP: envelopes, request ids, limits, alphabets, codes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelserver.app import create_app
from modelserver.config import Settings
from modelserver.service import ModelService
from tests.support.modelserver import served_model, wait_loaded
from tests.support.poll import wait_until

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
PROMOTER = "TATAAAAGGCGCGCCGCGTATAAATAGGCGCCGGCCAATCACGCGTTATAAAGCGCGCTATAAAAG"


def envelope(response: httpx.Response, status: int = 200) -> Any:
    """The answer's ``data``, after checking the success envelope and the request id header."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "message", "data", "timestamp", "request_id"}
    assert body["success"] is True and body["message"]
    assert TIMESTAMP.match(body["timestamp"])
    assert response.headers["x-request-id"] == body["request_id"]
    return body["data"]


def refused(response: httpx.Response, status: int, code: str) -> str:
    """The refusal's details, after checking the error envelope."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "message", "error", "timestamp", "request_id"}
    assert body["success"] is False and body["message"]
    assert body["error"]["code"] == code, body
    assert TIMESTAMP.match(body["timestamp"])
    assert response.headers["x-request-id"] == body["request_id"]
    return str(body["error"]["details"])


def test_every_endpoint_answers_an_envelope_with_the_request_id(dnabert2: str) -> None:
    with httpx.Client(base_url=dnabert2) as client:
        for method, path, body in [("GET", "/health", None), ("GET", "/model/info", None),
                                   ("POST", "/predict", {"sequence": "ACGT"}),
                                   ("POST", "/predict/batch", {"sequences": ["ACGT"]})]:
            given = f"req-{uuid.uuid4()}"
            response = client.request(method, path, json=body, headers={"X-Request-ID": given})
            envelope(response)
            assert response.json()["request_id"] == given
            fresh = client.request(method, path, json=body)
            uuid.UUID(envelope(fresh) and fresh.json()["request_id"])
        metrics = client.get("/metrics", headers={"Accept": "application/json", "X-Request-ID": "m-1"})
        assert envelope(metrics)["model_metrics"]["total_requests"] >= 2
        assert metrics.json()["request_id"] == "m-1"
        refusal = client.post("/predict", content=b"{", headers={"X-Request-ID": "bad-1"})
        refused(refusal, 400, "INVALID_REQUEST")
        assert refusal.json()["request_id"] == "bad-1"


def test_health_and_model_info(dnabert2: str) -> None:
    health = envelope(httpx.get(f"{dnabert2}/health"))
    assert health["status"] == "healthy" and health["model"] == "DNABERT2" and health["version"] == "1.0.0"
    assert health["device"] == "cpu" and health["gpu_available"] in (True, False)
    assert health["uptime"] >= 0 and health["memory_usage"].endswith("B")
    info = envelope(httpx.get(f"{dnabert2}/model/info"))
    assert info["name"] == "DNABERT2" and info["tasks"] == ["promoter_prediction"]
    assert info["max_sequence_length"] == 5120 and info["supported_species"]
    assert info["input_format"]["type"] == "string" and info["output_format"]["range"] == [0, 1]
    assert info["device"] == "cpu" and re.fullmatch(r"[0-9a-f]{64}", info["weights"]["sha256"])
    assert info["batching"] == {"enabled": True, "max_batch_size": 32, "max_wait_ms": 5.0}
    assert info["limits"] == {"max_batch_sequences": 100, "max_sequence_chars": 5120}
    assert info["probe"]["path"] == "/predict" and info["probe"]["expect"]["success"] is True


def test_predict_and_batch(dnabert2: str) -> None:
    data = envelope(httpx.post(f"{dnabert2}/predict", json={"sequence": PROMOTER,
                                                            "options": {"return_confidence": True, "batch_size": 1}}))
    assert set(data) == {"prediction", "confidence", "processing_time", "sequence_length", "details"}
    assert 0 <= data["prediction"] <= 1 and 0.5 <= data["confidence"] <= 1 and data["sequence_length"] == 66
    assert data["details"]["class"] in ("promoter", "non_promoter")
    assert data["details"]["probability"] == data["prediction"]
    # Lower case is read as upper case.
    lower = envelope(httpx.post(f"{dnabert2}/predict", json={"sequence": PROMOTER.lower()}))
    assert lower["prediction"] == data["prediction"]
    quiet = envelope(httpx.post(f"{dnabert2}/predict", json={"sequence": PROMOTER,
                                                             "options": {"return_confidence": False}}))
    assert quiet["confidence"] is None and quiet["prediction"] == data["prediction"]

    sequences = [PROMOTER, "ACGT" * 30, "N" * 10, "gattaca"]
    batch = envelope(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": sequences,
                                                                   "task_type": "promoter_prediction"}))
    assert batch["total_sequences"] == 4 and batch["processing_time"] >= 0
    assert [p["sequence"] for p in batch["predictions"]] == [s.upper() for s in sequences]
    assert batch["predictions"][0]["prediction"] == data["prediction"]
    assert all(set(p) >= {"sequence", "prediction", "confidence", "details"} for p in batch["predictions"])


def test_a_full_batch_of_long_sequences_is_answered(dnabert2: str) -> None:
    sequences = [("ACGTTGCA" * 640)[: 5120 - i] for i in range(100)]
    batch = envelope(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": sequences}, timeout=60))
    assert batch["total_sequences"] == 100
    alone = envelope(httpx.post(f"{dnabert2}/predict", json={"sequence": sequences[37]}))
    assert batch["predictions"][37]["prediction"] == alone["prediction"]


@pytest.mark.parametrize(("body", "needle"), [
    (b"{", "not valid JSON"),
    (b"[1, 2]", "body"),
    (b'{"task_type": "promoter_prediction"}', "sequence"),
    (b'{"sequence": 5}', "sequence"),
    (b'{"sequence": "ACGT", "options": {"return_confidence": "yes"}}', "return_confidence"),
    (b'{"sequence": "ACGT", "options": {"temperature": 1}}', "temperature"),
    (b'{"sequence": "ACGT", "sequnce": "ACGT"}', "sequnce"),
    (b'{"sequence": "ACGT", "task_type": "embedding"}', "embedding"),
])
def test_invalid_requests(dnabert2: str, body: bytes, needle: str) -> None:
    details = refused(httpx.post(f"{dnabert2}/predict", content=body), 400, "INVALID_REQUEST")
    assert needle in details


def test_batch_limits(dnabert2: str) -> None:
    assert "101" in refused(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": ["ACGT"] * 101}),
                            400, "INVALID_REQUEST")
    refused(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": []}), 400, "INVALID_REQUEST")
    refused(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": "ACGT"}), 400, "INVALID_REQUEST")
    details = refused(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": ["ACGT", "A" * 5121]}),
                      400, "SEQUENCE_TOO_LONG")
    assert "sequences[1]" in details and "5121" in details
    details = refused(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": ["ACGT", "ACGU"]}),
                      400, "INVALID_SEQUENCE")
    assert "sequences[1]" in details and "'U' at position 3" in details


def test_sequence_limits_and_alphabet(dnabert2: str) -> None:
    envelope(httpx.post(f"{dnabert2}/predict", json={"sequence": "A" * 5120}))
    assert "5121" in refused(httpx.post(f"{dnabert2}/predict", json={"sequence": "A" * 5121}),
                             400, "SEQUENCE_TOO_LONG")
    assert "'M' at position 0" in refused(httpx.post(f"{dnabert2}/predict", json={"sequence": "MKTAYIAK"}),
                                          400, "INVALID_SEQUENCE")
    assert "' ' at position 4" in refused(httpx.post(f"{dnabert2}/predict", json={"sequence": "ACGT ACGT"}),
                                          400, "INVALID_SEQUENCE")
    assert "empty" in refused(httpx.post(f"{dnabert2}/predict", json={"sequence": ""}), 400, "INVALID_SEQUENCE")


def test_unknown_paths_and_methods_answer_envelopes(dnabert2: str) -> None:
    refused(httpx.get(f"{dnabert2}/nowhere"), 404, "INVALID_REQUEST")
    refused(httpx.get(f"{dnabert2}/predict"), 405, "INVALID_REQUEST")


def test_metrics(dnabert2: str) -> None:
    httpx.post(f"{dnabert2}/predict", json={"sequence": "ACGT"})
    httpx.post(f"{dnabert2}/predict", json={"sequence": "ACGU"})
    response = httpx.get(f"{dnabert2}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'modelserver_requests_total{endpoint="/predict",outcome="success",task="promoter_prediction"}' in text
    assert 'modelserver_requests_total{endpoint="/predict",outcome="invalid",task="promoter_prediction"}' in text
    assert 'modelserver_request_duration_seconds_bucket{endpoint="/predict",le="0.005"}' in text
    assert "modelserver_batch_size_bucket" in text and "modelserver_batch_duration_seconds_count" in text
    assert 'modelserver_sequences_total{task="promoter_prediction"}' in text
    assert 'modelserver_device_info{device="cpu",model="DNABERT2"} 1.0' in text
    assert "modelserver_model_loaded 1.0" in text
    summary = envelope(httpx.get(f"{dnabert2}/metrics", headers={"Accept": "application/json"}))
    model = summary["model_metrics"]
    assert model["total_requests"] == model["successful_requests"] + model["failed_requests"]
    assert model["failed_requests"] >= 1 and model["average_response_time"] > 0
    assert set(summary["system_metrics"]) == {"cpu_usage", "memory_usage", "disk_usage", "network_io"}


def test_model_not_loaded(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path, model_type="dnabert2", model_device="cpu")
    with served_model(settings) as url:
        for method, path, body in [("GET", "/health", None), ("GET", "/model/info", None),
                                   ("POST", "/predict", {"sequence": "ACGT"}),
                                   ("POST", "/predict/batch", {"sequences": ["ACGT"]})]:
            details = refused(httpx.request(method, f"{url}{path}", json=body), 503, "MODEL_NOT_LOADED")
            assert "model_config.json" in details
        assert "modelserver_model_loaded 0.0" in httpx.get(f"{url}/metrics").text


def test_weights_that_do_not_load(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "dnabert2").mkdir()
    (tmp_path / "dnabert2" / "model_config.json").write_bytes((model_dir / "dnabert2" / "model_config.json").read_bytes())
    (tmp_path / "dnabert2" / "model.safetensors").write_bytes(b"garbage")
    with served_model(Settings(model_dir=tmp_path, model_type="dnabert2", model_device="cpu")) as url:
        def failed() -> str | None:
            details = refused(httpx.get(f"{url}/health"), 503, "MODEL_NOT_LOADED")
            return None if "loading" in details else details

        assert "cannot read the weights" in (wait_until(failed, 20, "the load to fail") or "")


def test_a_failing_model_and_an_unexpected_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(model_dir=model_dir, model_type="dnabert2", model_device="cpu"))
    service: ModelService = app.state.service
    with served_model(app) as url:
        wait_loaded(url)
        assert service.loaded is not None

        def broken(items: list[Any]) -> list[Any]:
            raise RuntimeError("the device fell over")

        monkeypatch.setattr(service.loaded.batcher, "_run", broken)
        for path, body in (("/predict", {"sequence": "ACGT"}), ("/predict/batch", {"sequences": ["ACGT", "GG"]})):
            assert "the device fell over" in refused(httpx.post(url + path, json=body), 500, "PREDICTION_FAILED")
        assert 'outcome="failed"' in httpx.get(f"{url}/metrics").text

        def unexpected() -> Any:
            raise KeyError("a bug")

        monkeypatch.setattr(service, "ready", unexpected)
        response = httpx.get(f"{url}/health", headers={"X-Request-ID": "oops-1"})
        refused(response, 500, "INTERNAL_ERROR")
        assert response.json()["request_id"] == "oops-1" and "a bug" not in response.text


def test_oversized_and_pathological_bodies(dnabert2: str) -> None:
    limit = 1 << 20
    too_big = b'{"sequence": "' + b"A" * limit + b'"}'
    assert "MODEL_MAX_BODY_BYTES" in refused(httpx.post(f"{dnabert2}/predict", content=too_big),
                                             413, "INVALID_REQUEST")

    def chunked() -> Iterator[bytes]:
        yield too_big[:limit // 2]
        yield too_big[limit // 2:]

    # No Content-Length: the cap holds while the body is read.
    refused(httpx.post(f"{dnabert2}/predict", content=chunked()), 413, "INVALID_REQUEST")
    assert "nests too deeply" in refused(httpx.post(f"{dnabert2}/predict", content=b"[" * 100_000),
                                         400, "INVALID_REQUEST")
    many = httpx.post(f"{dnabert2}/predict/batch", json={"sequences": [1] * 200_000})
    assert "200000 sequences; at most 100" in refused(many, 400, "INVALID_REQUEST")
    assert len(many.content) < 2_000
    details = refused(httpx.post(f"{dnabert2}/predict/batch", json={"sequences": [1] * 100}), 400, "INVALID_REQUEST")
    assert details.count("sequences.") == 10 and details.endswith("and 90 more problems")


def test_a_poisoned_input_fails_only_its_own_request(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(model_dir=model_dir, model_type="dnabert2", model_device="cpu",
                              model_max_wait_ms=200))
    service: ModelService = app.state.service
    with served_model(app) as url:
        wait_loaded(url)
        assert service.loaded is not None
        run = service.loaded.batcher._run
        sizes: list[int] = []

        def poisoned(items: list[Any]) -> list[Any]:
            sizes.append(len(items))
            if any(item.sequence == "ACGTNNNN" for item in items):
                raise RuntimeError("poisoned input")
            return run(items)

        monkeypatch.setattr(service.loaded.batcher, "_run", poisoned)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda s: httpx.post(f"{url}/predict", json={"sequence": s}, timeout=30),
                                    ["ACGTACGT", "ACGTNNNN", "GGGGCCCC"]))
        assert "poisoned input" in refused(answers[1], 500, "PREDICTION_FAILED")
        assert envelope(answers[0])["sequence_length"] == 8 and envelope(answers[2])["sequence_length"] == 8
        assert max(sizes) > 1, "the requests never shared a batch"


def test_a_dead_batcher_makes_the_service_not_ready(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(model_dir=model_dir, model_type="dnabert2", model_device="cpu"))
    service: ModelService = app.state.service
    with served_model(app) as url:
        wait_loaded(url)
        assert service.loaded is not None

        async def broken() -> list[Any]:
            raise ValueError("a bug in the loop")

        # The loop is waiting in the real _gather: the request is answered, the next round dies.
        monkeypatch.setattr(service.loaded.batcher, "_gather", broken)
        envelope(httpx.post(f"{url}/predict", json={"sequence": "ACGT"}))
        details = wait_until(lambda: service.loaded is not None and service.loaded.batcher.failure, 5,
                             "the loop to die")
        assert "a bug in the loop" in str(details)
        assert "a bug in the loop" in refused(httpx.get(f"{url}/health"), 503, "MODEL_NOT_LOADED")
        refused(httpx.post(f"{url}/predict", json={"sequence": "ACGT"}, timeout=5), 503, "MODEL_NOT_LOADED")
        assert "modelserver_model_loaded 0.0" in httpx.get(f"{url}/metrics").text
