"""GPU samples through the hub, on real PostgreSQL: a heartbeat carrying ``health.gpu_usage`` shows each
GPU on the hub's /metrics (``mmanager_gpu_*{controller,gpu}``) and in ``GET /api/admin/resources/usage``;
a lost GPU shows as lost; a controller that stops reporting GPUs loses their series."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from hub.db import Database
from tests.hub.conftest import KEY
from tests.hub.test_controller_keys import KeyHub, key_hub
from tests.hub.test_failure_handling import heartbeat
from tests.hub.test_monitoring import metric

GiB = 1024**3


@pytest.fixture
async def hub(db: Database) -> AsyncIterator[KeyHub]:
    async with key_hub(db) as found:
        yield found


def gpu_beat(controller_id: str, gpus: list[dict[str, Any]], sequence: int = 1) -> dict[str, Any]:
    body = heartbeat(controller_id, [])
    body["sequence"] = sequence
    body["health"]["gpu_usage"] = gpus
    return body


def sample(index: str, at: str, **fields: Any) -> dict[str, Any]:
    return {"index": index, "sampled_at": at, **fields}


async def test_gpu_samples_in_a_heartbeat_show_in_metrics_and_resources_usage(hub: KeyHub) -> None:
    at = "2026-01-01T00:00:00Z"
    gpus = [
        sample("0", at, utilization_percent=87.0, memory_used_bytes=30 * GiB, memory_total_bytes=80 * GiB,
               temperature_celsius=64.0, power_watts=251.5),
        # NVML could not read its temperature, and it has no power sensor: those have no series.
        sample("1", at, utilization_percent=0.0, memory_used_bytes=0, memory_total_bytes=24 * GiB,
               error="Unknown Error"),
        sample("2", at, lost=True, error="GPU is lost"),
    ]
    r = await hub.beat("ctl-x", KEY, gpu_beat("ctl-x", gpus))
    assert r.status_code == 200, r.text
    r = await hub.beat("ctl-y", KEY, heartbeat("ctl-y", []))
    assert r.status_code == 200, r.text
    await hub.parts.ingest.flush()

    text = (await hub.client.get("/metrics")).text
    assert metric(text, "mmanager_gpu_utilization_percent", controller="ctl-x", gpu="0") == [87.0]
    assert metric(text, "mmanager_gpu_memory_used_bytes", controller="ctl-x", gpu="0") == [30 * GiB]
    assert metric(text, "mmanager_gpu_memory_total_bytes", controller="ctl-x", gpu="0") == [80 * GiB]
    assert metric(text, "mmanager_gpu_temperature_celsius", controller="ctl-x", gpu="0") == [64.0]
    assert metric(text, "mmanager_gpu_power_watts", controller="ctl-x", gpu="0") == [251.5]
    assert metric(text, "mmanager_gpu_lost", controller="ctl-x", gpu="0") == [0.0]
    assert metric(text, "mmanager_gpu_memory_total_bytes", controller="ctl-x", gpu="1") == [24 * GiB]
    assert metric(text, "mmanager_gpu_temperature_celsius", controller="ctl-x", gpu="1") == []
    assert metric(text, "mmanager_gpu_power_watts", controller="ctl-x", gpu="1") == []
    assert metric(text, "mmanager_gpu_lost", controller="ctl-x", gpu="2") == [1.0]
    assert metric(text, "mmanager_gpu_utilization_percent", controller="ctl-x", gpu="2") == []
    assert metric(text, "mmanager_gpu_lost", controller="ctl-y") == []

    usage = (await hub.client.get("/api/admin/resources/usage")).json()
    by_id = {c["id"]: c for c in usage["controllers"]}
    assert by_id["ctl-y"]["gpu_usage"] == []
    shown = by_id["ctl-x"]["gpu_usage"]
    assert [g["index"] for g in shown] == ["0", "1", "2"]
    assert shown[0] == {"index": "0", "sampled_at": "2026-01-01T00:00:00Z", "lost": False,
                        "utilization_percent": 87.0, "memory_used_bytes": 30 * GiB,
                        "memory_total_bytes": 80 * GiB, "temperature_celsius": 64.0, "power_watts": 251.5}
    assert shown[1]["error"] == "Unknown Error" and shown[1]["temperature_celsius"] is None
    assert shown[2]["lost"] is True and shown[2]["error"] == "GPU is lost"

    # The next sample replaces the values; a GPU no longer reported loses its series.
    later = "2026-01-01T00:00:10Z"
    r = await hub.beat("ctl-x", KEY, gpu_beat("ctl-x", [sample("0", later, utilization_percent=12.0,
                                                                memory_used_bytes=GiB, memory_total_bytes=80 * GiB)], 2))
    assert r.status_code == 200, r.text
    await hub.parts.ingest.flush()
    text = (await hub.client.get("/metrics")).text
    assert metric(text, "mmanager_gpu_utilization_percent", controller="ctl-x", gpu="0") == [12.0]
    assert metric(text, "mmanager_gpu_temperature_celsius", controller="ctl-x", gpu="0") == []
    assert metric(text, "mmanager_gpu_lost", controller="ctl-x", gpu="2") == []

    # A controller that stops reporting GPUs (NVML gone) loses every series.
    r = await hub.beat("ctl-x", KEY, gpu_beat("ctl-x", [], 3))
    assert r.status_code == 200, r.text
    await hub.parts.ingest.flush()
    text = (await hub.client.get("/metrics")).text
    assert metric(text, "mmanager_gpu_lost", controller="ctl-x") == []
    usage = (await hub.client.get("/api/admin/resources/usage")).json()
    assert {c["id"]: c["gpu_usage"] for c in usage["controllers"]}["ctl-x"] == []
