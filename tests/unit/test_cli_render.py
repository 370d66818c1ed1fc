"""How the client commands show the hub's answers: tables that never read a value as markup, the API's JSON,
and a long operation's progress read from its ``details.progress``."""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console

from hub.schemas import OperationOut, ServiceOut
from mmanager.commands import render
from mmanager.commands.session import amount, progress_fields

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)


def service(name: str = "hello", **changes: Any) -> ServiceOut:
    return ServiceOut.model_validate({
        "id": "a" * 32, "name": name, "owner": "alice", "repo": "default",
        "spec": {"name": name, "image": "img:1", "replicas": 2}, "version": 3, "desired_state": "running",
        "status": "running", "status_message": None, "controller_id": "cpu-01", "container_id": "c" * 64,
        "epoch": 1, "endpoint": None, "url": "http://gw/s/alice/hello/", "health": "healthy",
        "replicas": [{"id": "c" * 64, "controller_id": "cpu-01", "state": "running", "health": "healthy",
                      "endpoint": {"host": "10.0.0.1", "ports": {"5000": 32768}}},
                     {"id": "d" * 64, "controller_id": "cpu-02", "state": "starting", "health": "unknown",
                      "endpoint": None}],
        "created_at": NOW, "updated_at": NOW, **changes})


def operation(**details: Any) -> OperationOut:
    return OperationOut(id="op1", service_id="s1", controller_id=None, container_id=None, operation="update",
                        status="running", error=None, actor="alice", details=details, created_at=NOW,
                        finished_at=None)


def shown(view: Any, value: Any) -> str:
    out = io.StringIO()
    view(Console(file=out, width=300, color_system=None), value)
    return out.getvalue()


def test_a_services_row_is_one_line_with_replicas_running_of_asked() -> None:
    text = shown(render.services, [service()])
    row = next(line for line in text.splitlines() if "hello" in line)
    assert row.split() == ["hello", "alice", "running", "healthy", "1/2", "3", "http://gw/s/alice/hello/", "a" * 32]


def test_values_are_never_read_as_markup() -> None:
    text = shown(render.services, [service(name="[bold]x[/bold]<script>")])
    assert "[bold]x[/bold]<script>" in text


def test_a_service_shows_each_replica() -> None:
    text = shown(render.service, service(status_message="1 of 2 copies starting"))
    assert "running (1 of 2 copies starting)" in text
    assert "10.0.0.1 5000->32768" in text
    assert "cpu-02" in text and "starting" in text


def test_json_is_the_apis() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        render.print_json([service()])
    assert json.loads(out.getvalue()) == [service().model_dump(mode="json")]


def test_when_is_utc_with_its_age() -> None:
    assert render.when(NOW - timedelta(minutes=5), now=NOW) == "2026-12-07 10:55:00 (5m ago)"
    assert render.when(None) == "-"


def test_progress_is_read_from_the_operations_details() -> None:
    assert progress_fields(operation(progress={"done": 1, "total": 3, "unit": "replicas", "step": "replacing"})) \
        == {"description": "update: replacing", "total": 3, "completed": 1, "unit": "replicas"}
    # No progress reported yet: an indeterminate bar named after the operation.
    assert progress_fields(operation()) == {"description": "update running", "total": None, "completed": 0,
                                            "unit": ""}
    # A total of 0, or counts that are not numbers: an indeterminate bar, never a division by zero.
    assert progress_fields(operation(progress={"done": 5, "total": 0, "unit": "bytes", "step": "pulling"})) \
        == {"description": "update: pulling", "total": None, "completed": 5, "unit": "bytes"}
    assert progress_fields(operation(progress={"done": "x", "total": None, "unit": "replicas"}))["completed"] == 0
    assert render.progress_text(operation(progress={"done": 3, "total": 0, "unit": "bytes"})) == "3 bytes"


def test_amounts_read_as_their_unit() -> None:
    assert amount(1, 3, "replicas") == "1/3 replicas"
    assert amount(12_500_000, 40_000_000, "bytes") == "12.5 MB/40.0 MB"
    assert amount(2, None, "services") == "2 services"
    assert amount(0, None, "") == ""
    assert render.progress_text(operation(progress={"done": 2, "total": 2, "unit": "services", "step": "drained"})) \
        == "2/2 services drained"


EVIL = "\x1b]0;owned\x07x\x1b[2J\x9b31my\r\n"


def test_control_characters_from_the_hub_never_reach_the_terminal() -> None:
    text = shown(render.services, [service(name="n" + EVIL)]) + shown(
        render.service, service(status_message=EVIL, health_detail=EVIL))
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) < 0xA0 for c in text)
    # What is left reads as the text around the codes, each row still one line.
    assert "n]0;ownedx[2J31my" in next(line for line in text.splitlines() if line.startswith("n]"))
    assert render.escape("[b]\x1b[31m") == "\\[b][31m"


def test_json_escapes_the_controls_it_would_print_raw() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        render.print_json({"name": EVIL, "ok": "é"})
    assert "\x1b" not in out.getvalue() and "\x9b" not in out.getvalue() and "é" in out.getvalue()
    assert json.loads(out.getvalue()) == {"name": EVIL, "ok": "é"}
