"""A small run of bench.model_cache: its own code, with a tiny model file and one run, so that it still works
and measures what it claims to (a cold start fetched the file, a warm one found it cached). Correctness only,
no timing: nothing here compares a number with a target."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from bench import model_cache
from tests.support.pg import create_database


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "bench")


@pytest.mark.slow
def test_model_cache_small(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    result = model_cache.measure(db_url, tmp_path, 64 * 1024, 1, docker_client)
    assert result["runs"] == 1 and len(result["times"]["cold"]) == len(result["times"]["warm"]) == 1
    # The cold start fetched the whole file from the hub before its create, the warm one nothing: each
    # operation's model_sync says so.
    assert result["fetched_bytes"] == {"cold": [64 * 1024], "warm": [0]}
