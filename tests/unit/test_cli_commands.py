"""The client commands in-process, on a fake SDK client (unit tests only; tests/test_cli.py runs the real
command against a real hub): which calls each makes, what it prints, and how it fails."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hub.schemas import MeOut, ModelTypeOut, OperationOut, ServiceOut, ServiceSpec
from mmanager.client import ApiError, config
from tests.support.cli_fake import FakeClientBase, run, use_client

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
SPEC = "name: hello\nimage: img:1\nresources: {memory_limit: 32MB}\n"


def service_out(spec: dict[str, Any], version: int = 1) -> ServiceOut:
    return ServiceOut.model_validate({
        "id": "a" * 32, "name": spec["name"], "owner": "alice", "repo": "default",
        "spec": ServiceSpec.model_validate(spec).model_dump(mode="json"), "version": version,
        "desired_state": "running", "status": "running", "status_message": None, "controller_id": "c1",
        "container_id": "c" * 64, "epoch": 1, "endpoint": None, "url": None, "health": "healthy", "replicas": [],
        "created_at": NOW, "updated_at": NOW})


TYPE = ModelTypeOut(name="dnabert2", task="embedding", description="", image="img:1", resources={}, replicas=1,
                    probe=None, ports={}, health_check=None, environment={"MODEL_ID": "zhihan/dnabert2"}, spec={},
                    created_at=NOW, updated_at=NOW)


class FakeServices:
    def __init__(self) -> None:
        self.rows: dict[str, ServiceOut] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.refused: set[str] = set()
        self.interrupted = False

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
        if spec["name"] in self.refused:
            raise ApiError(409, "QUOTA_EXCEEDED", "no room for it")
        if spec.get("model"):
            # As the hub's create from a type: the file's env over the type's environment.
            spec = {**spec, "image": spec.get("image") or TYPE.image, "env": {**TYPE.environment, **spec.get("env", {})}}
        self.rows[spec["name"]] = service_out(spec)
        return self.rows[spec["name"]]

    def update(self, ref: str, patch: dict[str, Any], wait: bool = True, progress: Any = None) -> ServiceOut:
        self.calls.append(("update", ref, patch))
        if self.interrupted:
            progress(OperationOut(id="op-7", service_id="a" * 32, controller_id="c1", container_id=None,
                                  operation="update", status="running", error=None, actor="alice", details={},
                                  created_at=NOW, finished_at=None))
            raise KeyboardInterrupt
        old = self.get(ref)
        self.rows[old.name] = service_out({**old.spec, **patch}, old.version + 1)
        return self.rows[old.name]

    def delete(self, ref: str) -> None:
        self.calls.append(("delete", ref))
        del self.rows[self.get(ref).name]


class FakeModels:
    def __init__(self) -> None:
        self.calls = 0

    def get(self, name: str) -> ModelTypeOut:
        self.calls += 1
        if name != TYPE.name:
            raise ApiError(404, "MODEL_NOT_FOUND", f"model type {name!r} not found")
        return TYPE


class FakeClient(FakeClientBase):
    def __init__(self) -> None:
        self.services = FakeServices()
        self.models = FakeModels()
        self.admin = False

    def me(self) -> MeOut:
        return MeOut(username="alice", admin=self.admin)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    return use_client(monkeypatch, FakeClient())


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


def test_apply_of_a_spec_from_a_model_type_is_unchanged_the_second_time(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text("name: hello\nmodel: dnabert2\nenv: {MODE: slow}\n")
    run("apply", "-f", str(spec))
    assert fake.services.rows["hello"].spec["env"] == {"MODEL_ID": "zhihan/dnabert2", "MODE": "slow"}
    assert run("apply", "-f", str(spec)).stdout == "hello: unchanged\n"
    spec.write_text("name: hello\nmodel: dnabert2\nenv: {MODE: fast}\n")
    assert run("apply", "-f", str(spec)).stdout.splitlines()[1] == "  env.MODE: slow -> fast"
    assert fake.services.calls[-1][2] == {"env": {"MODEL_ID": "zhihan/dnabert2", "MODE": "fast"}}
    assert fake.models.calls == 2  # once a run, for the specs that need it


def test_apply_json_says_what_was_applied_before_a_spec_failed(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "three.yaml"
    spec.write_text(SPEC + "---\nname: full\nimage: img:1\n---\nname: last\nimage: img:1\n")
    fake.services.refused.add("full")
    done = run("apply", "-f", str(spec), "--json")
    assert done.exit_code == 1
    assert [(s["name"], s["action"]) for s in json.loads(done.stdout)["services"]] == [
        ("hello", "create"), ("full", "error"), ("last", "skipped")]
    assert json.loads(done.stdout)["services"][1] == {"name": "full", "action": "error", "code": "QUOTA_EXCEEDED",
                                                      "message": "no room for it"}
    assert done.stderr == "error: QUOTA_EXCEEDED: no room for it\n"
    shown = run("apply", "-f", str(spec))
    assert shown.exit_code == 1 and "not applied (an earlier spec failed): last" in shown.stderr


def test_apply_for_another_owner_needs_an_admin(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC)
    done = run("apply", "-f", str(spec), "--owner", "bob", "--dry-run")
    assert (done.exit_code, done.stdout) == (1, "")
    assert done.stderr.startswith("error: ADMIN_REQUIRED: --owner bob: ") and done.stderr.count("\n") == 1
    assert run("apply", "-f", str(spec), "--owner", "alice", "--dry-run").exit_code == 0
    fake.admin = True
    assert run("apply", "-f", str(spec), "--owner", "bob", "--dry-run").stdout == "hello: new service (dry run)\n"


def test_ctrl_c_names_the_operation_that_goes_on(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC)
    run("apply", "-f", str(spec))
    spec.write_text(SPEC + "replicas: 2\n")
    fake.services.interrupted = True
    done = run("apply", "-f", str(spec))
    assert done.exit_code == 130
    assert done.stderr == "interrupted; operation op-7 continues on the hub: mmanager operations wait op-7\n"


def test_a_hub_value_in_an_error_cannot_drive_the_terminal(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(ref: str) -> ServiceOut:
        raise ApiError(409, "CONFLICT", "held by \x1b]0;owned\x07\x9b2Jx\nsecond line")

    monkeypatch.setattr(fake.services, "get", refuse)
    done = run("services", "delete", "hello", "--yes")
    assert done.stderr == "error: CONFLICT: held by ]0;owned2Jx second line\n"


@pytest.mark.parametrize(("url", "why"), [("http://[::1", "not a URL"), ("127.0.0.1:8000", "the scheme is missing")])
def test_login_refuses_a_url_no_client_can_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str,
                                               why: str) -> None:
    monkeypatch.setenv("MMANAGER_CONFIG", str(tmp_path / "config.json"))
    done = run("login", url, "--token", "t")
    assert done.exit_code == 1 and done.stderr.startswith(f"error: INVALID_URL: hub URL {url!r}: ")
    assert why in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "config.json").exists()
    monkeypatch.setenv("MMANAGER_HUB_URL", url)
    monkeypatch.setenv("MMANAGER_TOKEN", "t")
    listed = run("services", "list")
    assert listed.exit_code == 1 and listed.stderr.startswith(f"error: INVALID_URL: MMANAGER_HUB_URL {url!r}: ")


def test_ctrl_c_while_mmanager_starts_is_no_traceback() -> None:
    # A real SIGINT while mmanager.cli imports uvicorn: the process exits 130 and prints nothing.
    script = (
        "import os, signal, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'uvicorn':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['mmanager', '--help']\n"
        "from mmanager.cli import app\n"
        "sys.exit(app())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "")
