"""What a spec counts against a user's quotas, and what a memory quota requires of every spec written
(``hub.services.quotas``), with the owner's locked row and their services faked."""

from __future__ import annotations

from typing import Any

import pytest

from hub.config import HubSettings
from hub.errors import InvalidRequest, QuotaExceeded
from hub.schemas import ServiceSpec
from hub.services.quotas import demand, hold_quota

MB = 1024**2
GPU = {"name": "g", "image": "busybox", "health_check": {"port": 80, "path": "/"},
       "resources": {"gpu_required": True, "gpu_count": 1, "memory_limit": "16MB"}}


def spec(**fields: Any) -> ServiceSpec:
    return ServiceSpec.model_validate({**GPU, **fields})


class FakeTx:
    """The owner's row (alice, 64MB of memory) and their services' rows, as ``hold_quota`` reads them."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def first(self, statement: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"id": 1, "username": "alice", "is_admin": False, "max_services": None, "max_gpus": None,
                "max_memory_bytes": 64 * MB}

    async def all(self, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.rows


def test_a_replica_counts_the_larger_of_its_memory_and_its_fallbacks() -> None:
    fallback = {"image": "busybox", "resources": {"memory_limit": "48MB"}}
    assert demand(spec(cpu_fallback=fallback), 2).memory_bytes == 96 * MB
    assert demand(spec(cpu_fallback=fallback).model_dump(mode="json"), 2).memory_bytes == 96 * MB
    small = {"image": "busybox", "resources": {"memory_limit": "8MB"}}
    assert demand(spec(cpu_fallback=small), 3).memory_bytes == 48 * MB
    assert demand(spec(), 1).memory_bytes == 16 * MB


async def test_a_memory_quota_requires_every_written_spec_to_name_its_memory() -> None:
    settings = HubSettings(api_key="k" * 32, _env_file=None)
    mine = spec()
    tx = FakeTx([{"id": "s1", "name": "g", "replicas": 1, "spec": mine.model_dump(mode="json")}])
    # An update or rollback of the same count without a memory limit: refused although it grows no count.
    bare = spec(resources={"gpu_required": True, "gpu_count": 1})
    with pytest.raises(InvalidRequest) as refused:
        await hold_quota(tx, 1, "g", settings, bare, 1, "s1")  # type: ignore[arg-type]
    assert refused.value.code == "MEMORY_LIMIT_REQUIRED"
    assert refused.value.details["fields"] == ["resources.memory_limit"]
    # A CPU fallback without one, too.
    loose = spec(cpu_fallback={"image": "busybox"})
    with pytest.raises(InvalidRequest) as refused:
        await hold_quota(tx, 1, "g", settings, loose, 1, "s1")  # type: ignore[arg-type]
    assert refused.value.details["fields"] == ["cpu_fallback.resources.memory_limit"]
    # A fallback asking for more than the quota leaves is counted and refused.
    big = spec(cpu_fallback={"image": "busybox", "resources": {"memory_limit": "80MB"}})
    with pytest.raises(QuotaExceeded):
        await hold_quota(tx, 1, "g", settings, big, 1, "s1")  # type: ignore[arg-type]
    fits = spec(cpu_fallback={"image": "busybox", "resources": {"memory_limit": "64MB"}})
    assert await hold_quota(tx, 1, "g", settings, fits, 1, "s1") is None  # type: ignore[arg-type]
