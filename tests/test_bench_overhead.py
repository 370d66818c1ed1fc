"""Small runs of bench.overhead, bench.api_floor and bench.idle: the benchmark code still works and its
output has its fields (correctness, not timing: nothing here compares a number with a target)."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from bench import api_floor, idle, overhead
from bench.pyspy import summarize
from tests.support.pg import create_database

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "bench")


@pytest.mark.slow
def test_overhead_small(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    raw = overhead.measure(db_url, tmp_path, 2, docker_client)
    result = overhead.summarize(raw)
    # The comparison is fair only if the SDK-made container has the limits and hardening the hub's has.
    assert result["host_config_differences"] == {}
    assert result["runs"] == 2
    for way in overhead.WAYS:
        assert len(raw["times"][way]) == 2
        assert 0 < result[way]["min_ms"] <= result[way]["median_ms"] <= result[way]["p90_ms"] <= result[way]["max_ms"]
    for key in ("ratio_hub_docker", "ratio_controller_docker", "ratio_hub_controller"):
        assert result[key] > 0
    assert len(raw["operation_s"]) == 2
    assert result["hub_operation"]["median_ms"] > 0
    assert result["hub_controller_call_mean_ms"] > 0
    # The bare controller's and the SDK's containers are gone (LocalDeployment.stop removes the hub's).
    assert not docker_client.containers.list(all=True, filters={"name": "mm-bench-"})


@pytest.mark.slow
def test_api_floor_small(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    result = api_floor.measure(db_url, tmp_path, docker_client, seconds=0.5, warmup=0.1, connections=4)
    assert result["connections"] == 4
    for route in ("docs", "health", "service", "services", "status"):
        r = result[route]
        assert r["requests"] > 0 and r["requests_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert set(r["cores_used"]) == {"hub", "postgres", "controller", "load generator"}
        assert r["cores_used"]["hub"] > 0 and r["requests_per_s_per_hub_core"] > 0
    # No database behind /docs; the service read reaches it (the token is checked in memory). PostgreSQL
    # reports its transaction counters lazily, so a short window may see none of the read's: its CPU time
    # shows it. The controller is behind /status.
    assert result["docs"]["pg_transactions_per_request"] < 0.5
    assert result["service"]["cores_used"]["postgres"] > 0
    assert result["services"]["path"].endswith("(4 services)")
    assert result["status"]["cores_used"]["controller"] > 0


@pytest.mark.slow
def test_idle_small(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    result = idle.measure(db_url, tmp_path, docker_client, services=2, seconds=1.0, settle=0.2)
    assert result["services"] == 2 and result["seconds"] == 1.0
    assert result["hub_cores"] > 0  # its loops run, and are counted
    assert result["hub_error_lines"] == 0, result["first_errors"]  # and work (a failing tick would log)


def test_profile_summary() -> None:
    collapsed = "\n".join([
        f"process 1;main (/x/lib/python3.11/asyncio/runners.py:44);get_for ({ROOT}/hub/services/lifecycle/manager.py:10);"
        "execute (/x/site-packages/sqlalchemy/orm/session.py:5) 6",
        f"process 1;main (/x/lib/python3.11/asyncio/runners.py:44);get_for ({ROOT}/hub/services/lifecycle/manager.py:12) 2",
        "process 1;main (/x/lib/python3.11/asyncio/runners.py:44);dumps (/x/lib/python3.11/json/encoder.py:1) 2",
    ])
    summary = summarize(collapsed)
    assert summary["samples"] == 10
    assert summary["self"][0] == {"function": "execute (sqlalchemy/orm/session.py)", "share": 0.6}
    assert {"package": "sqlalchemy", "share": 0.6} in summary["packages"]
    assert {"package": "json", "share": 0.2} in summary["packages"]
    # Lines of one function are one entry; only the project's functions are in the inclusive list.
    assert summary["inclusive"] == [{"function": "get_for (hub/services/lifecycle/manager.py)", "share": 0.8}]
