"""The client commands in-process, on a fake SDK client (unit tests only; tests/test_cli.py runs the real
command against a real hub): which calls each makes, what it prints, and how it fails."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hub.schemas import MeOut, ServiceOut, ServiceSpec
from mmanager.cli import app
from mmanager.client import ApiError, config
from mmanager.commands import session

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
SPEC = "name: hello\nimage: img:1\nresources: {memory_limit: 32MB}\n"


def service_out(spec: dict[str, Any], version: int = 1) -> ServiceOut:
    return ServiceOut.model_validate({
        "id": "a" * 32, "name": spec["name"], "owner": "alice", "repo": "default",
        "spec": ServiceSpec.model_validate(spec).model_dump(mode="json"), "version": version,
        "desired_state": "running", "status": "running", "status_message": None, "controller_id": "c1",
        "container_id": "c" * 64, "epoch": 1, "endpoint": None, "url": None, "health": "healthy", "replicas": [],
        "created_at": NOW, "updated_at": NOW})


class FakeServices:
    def __init__(self) -> None:
        self.rows: dict[str, ServiceOut] = {}
        self.calls: list[tuple[Any, ...]] = []

    def list(self, name: str | None = None, owner: str | None = None, limit: int = 100,
             offset: int = 0) -> list[ServiceOut]:
        return [s for s in self.rows.values() if name in (None, s.name)]

    def get(self, ref: str) -> ServiceOut:
        for s in self.rows.values():
            if ref in (s.id, s.name):
                return s
        raise ApiError(404, "SERVICE_NOT_FOUND", f"you have no service named {ref!r}")

    def create(self, spec: dict[str, Any], owner: str | None = None, repo: str = "default", wait: bool = True,
               progress: Any = None) -> ServiceOut:
        self.calls.append(("create", spec))
        self.rows[spec["name"]] = service_out(spec)
        return self.rows[spec["name"]]

    def update(self, ref: str, patch: dict[str, Any], wait: bool = True, progress: Any = None) -> ServiceOut:
        self.calls.append(("update", ref, patch))
        old = self.get(ref)
        self.rows[old.name] = service_out({**old.spec, **patch}, old.version + 1)
        return self.rows[old.name]

    def delete(self, ref: str) -> None:
        self.calls.append(("delete", ref))
        del self.rows[self.get(ref).name]


class FakeClient:
    def __init__(self) -> None:
        self.services = FakeServices()

    def me(self) -> MeOut:
        return MeOut(username="alice", admin=False)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(session, "make_client", lambda profile: client)
    return client


def run(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=stdin)


def test_apply_creates_then_is_unchanged_then_patches_what_differs(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC)
    assert run("apply", "-f", str(spec)).stdout.splitlines() == ["hello: new service",
                                                                 "hello: created, version 1, running"]
    assert run("apply", "-f", str(spec)).stdout == "hello: unchanged\n"
    spec.write_text(SPEC.replace("32MB", "64MB") + "replicas: 2\n")
    done = run("apply", "-f", str(spec))
    assert done.stdout.splitlines() == ["hello: changes", "  resources.memory_limit: 32MB -> 64MB",
                                        "  replicas: 1 -> 2", "hello: updated, version 2, running"]
    assert [c[0] for c in fake.services.calls] == ["create", "update"]
    assert fake.services.calls[1][2]["replicas"] == 2


def test_apply_sends_write_only_fields_with_a_change_or_when_asked(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC + "registry_auth: {username: u, password: p}\n")
    run("apply", "-f", str(spec))
    assert run("apply", "-f", str(spec)).stdout == "hello: unchanged (registry_auth: write-only, not compared)\n"
    done = run("apply", "-f", str(spec), "--send-write-only")
    assert "  registry_auth: (write-only) sent" in done.stdout.splitlines()
    assert fake.services.calls[-1] == ("update", "a" * 32, {"registry_auth": {"username": "u", "password": "p"}})


def test_apply_dry_run_and_json(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC)
    assert run("apply", "-f", str(spec), "--dry-run").stdout == "hello: new service (dry run)\n"
    assert fake.services.calls == []
    run("apply", "-f", str(spec))
    spec.write_text(SPEC.replace("32MB", "64MB"))
    answer = json.loads(run("apply", "-f", str(spec), "--json").stdout)
    assert answer["services"][0]["action"] == "update"
    assert answer["services"][0]["changes"] == [{"field": "resources.memory_limit", "old": "32MB", "new": "64MB"}]
    assert answer["services"][0]["service"]["version"] == 2


def test_a_bad_spec_among_good_ones_changes_nothing(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "both.yaml"
    spec.write_text(SPEC + "---\nname: bad\nimage: img:1\nreplicas: 0\n")
    done = run("apply", "-f", str(spec))
    assert done.exit_code == 1
    assert done.stderr.startswith("error: VALIDATION_ERROR: ") and "replicas" in done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert fake.services.calls == []


def test_an_api_error_is_one_line_and_status_1(fake: FakeClient) -> None:
    done = run("services", "delete", "nope", "--yes")
    assert (done.exit_code, done.stderr) == (1, "error: SERVICE_NOT_FOUND: you have no service named 'nope'\n")


def test_delete_asks_first(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC)
    run("apply", "-f", str(spec))
    kept = run("services", "delete", "hello", stdin="n\n")
    assert kept.exit_code == 2 and "not deleted" in kept.stderr
    assert run("services", "delete", "hello", stdin="y\n").stdout.endswith("hello: deleted\n")
    assert fake.services.calls[-1] == ("delete", "a" * 32)


def test_apply_reads_stdin(fake: FakeClient) -> None:
    assert run("apply", "-f", "-", stdin=SPEC).stdout.splitlines()[0] == "hello: new service"


def test_an_unreadable_file_is_a_usage_error(fake: FakeClient, tmp_path: Path) -> None:
    done = run("apply", "-f", str(tmp_path / "none.yaml"))
    assert done.exit_code == 2 and done.stderr.startswith("error: INVALID_FILE: ")


def test_logout_forgets_a_profile_and_picks_another_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMANAGER_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.delenv("MMANAGER_PROFILE", raising=False)
    config.save_profile("lab1", "http://hub1:8000", "t1")
    config.save_profile("lab2", "http://hub2:8000", "t2")
    done = run("logout", "--json")
    assert json.loads(done.stdout) == {"profile": "lab2", "removed": True, "current": "lab1"}
    assert config.load() == {"current": "lab1", "profiles": {"lab1": {"url": "http://hub1:8000", "token": "t1"}}}
    missing = run("logout", "--profile", "lab2")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: PROFILE_NOT_FOUND: ")
