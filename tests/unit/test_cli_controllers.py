"""``mmanager controllers update|delete`` in-process on a fake SDK client, and the SDK's calls behind them on a
scripted hub (unit tests only; tests/hub/test_controllers_admin.py runs the routes on a real hub)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from hub.schemas import ControllerOut
from mmanager.client import ApiError
from tests.support.cli_fake import FakeClientBase, run, use_client
from tests.unit.test_client_sdk import client, script

NOW = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)
ROW = {"id": "gpu-1", "url": "http://gpu-1:8001", "server_type": "gpu", "enabled": True, "priority": 1,
       "weight": 100, "status": "healthy", "last_heartbeat_at": NOW.isoformat(), "max_containers": 20,
       "max_containers_cap": None, "containers_running": 2, "load_percentage": 5.0, "memory_usage_percent": 10.0,
       "gpus": [], "error": None}


class FakeControllers:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def update(self, controller_id: str, **changes: Any) -> ControllerOut:
        self.calls.append(("update", controller_id, dict(changes)))
        cap = changes.pop("max_containers", ROW["max_containers_cap"])
        return ControllerOut.model_validate({**ROW, **changes, "max_containers_cap": cap, "id": controller_id})

    def drain(self, controller_id: str, progress: Any = None) -> ControllerOut:
        self.calls.append(("drain", controller_id))
        return ControllerOut.model_validate({**ROW, "enabled": False})

    def delete(self, controller_id: str, drain: bool = False) -> None:
        self.calls.append(("delete", controller_id))
        if controller_id == "busy":
            raise ApiError(409, "CONTROLLER_HAS_SERVICES", "controller 'busy' holds 1 service(s)")


class FakeClient(FakeClientBase):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.controllers = FakeControllers(self.calls)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    return use_client(monkeypatch, FakeClient())


def test_update_sends_only_what_was_named(fake: FakeClient) -> None:
    done = run("controllers", "update", "gpu-1", "--weight", "150", "--priority", "0")
    assert done.exit_code == 0, done.output
    assert "gpu-1" in done.stdout and "weight 150" in done.stdout and "priority 0" in done.stdout
    lifted = run("controllers", "update", "gpu-1", "--no-cap", "--url", "http://new:8001", "--json")
    assert json.loads(lifted.stdout)["url"] == "http://new:8001"
    assert fake.calls == [("update", "gpu-1", {"priority": 0, "weight": 150}),
                          ("update", "gpu-1", {"url": "http://new:8001", "max_containers": None})]


def test_update_refuses_nothing_to_change_and_out_of_range_values(fake: FakeClient) -> None:
    for args in ([], ["--weight", "-1"], ["--priority", "1001"], ["--server-type", "tpu"],
                 ["--max-containers", "3", "--no-cap"]):
        assert run("controllers", "update", "gpu-1", *args).exit_code == 2, args
    assert fake.calls == []


def test_delete_and_delete_after_a_drain(fake: FakeClient) -> None:
    assert run("controllers", "delete", "gpu-1").stdout == "gpu-1: deleted\n"
    assert run("controllers", "delete", "gpu-1", "--drain").exit_code == 0
    refused = run("controllers", "delete", "busy")
    assert refused.exit_code == 1 and "CONTROLLER_HAS_SERVICES" in refused.stderr
    assert fake.calls == [("delete", "gpu-1"), ("drain", "gpu-1"), ("delete", "gpu-1"), ("delete", "busy")]


def test_the_sdk_patches_and_deletes() -> None:
    seen: list[str] = []
    bodies: list[Any] = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content) if request.content else None)
        return script({
            ("PATCH", "/api/admin/controllers/gpu-1"): httpx.Response(200, json={**ROW, "weight": 5}),
            ("DELETE", "/api/admin/controllers/gpu-1"): httpx.Response(204),
        }, seen)(request)
    c = client(handle)
    assert c.controllers.update("gpu-1", weight=5, max_containers=None).weight == 5
    assert c.controllers.delete("gpu-1") is None
    assert c.controllers.delete("gpu-1", drain=True) is None
    assert seen == ["PATCH /api/admin/controllers/gpu-1", "DELETE /api/admin/controllers/gpu-1",
                    "DELETE /api/admin/controllers/gpu-1?drain=true"]
    assert bodies == [{"weight": 5, "max_containers": None}, None, None]
