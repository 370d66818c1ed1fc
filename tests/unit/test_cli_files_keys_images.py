"""``mmanager models files``, ``services keys`` and ``images`` in-process, on a fake SDK client (unit tests
only; tests/test_cli.py runs them against a real hub): the calls each makes, what it prints, how it fails."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hub.schemas import ControllerImagesOut, ImageOutcome, ModelFileOut, ServiceKeyCreated, ServiceKeyOut
from mmanager.client import ApiError
from tests.support.cli_fake import FakeClientBase, run, use_client

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
DIGEST = "sha256:" + "d" * 64


class FakeFiles:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def upload(self, path: Any, name: str | None = None, progress: Any = None) -> ModelFileOut:
        self.calls.append(("upload", Path(path).read_bytes(), name, progress))
        return ModelFileOut(digest=DIGEST, name=name or "d" * 64, size=3, uploaded_by="alice", created_at=NOW)

    def list(self, limit: int = 100, offset: int = 0) -> list[ModelFileOut]:
        return [ModelFileOut(digest=DIGEST, name="w\x1b[31m.bin", size=2_500_000, uploaded_by="alice",
                             created_at=NOW)]

    def delete(self, digest: str) -> None:
        self.calls.append(("delete", digest))
        if digest != DIGEST:
            raise ApiError(404, "MODEL_FILE_NOT_FOUND", f"model file {digest} not found")


class FakeKeys:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def create(self, ref: str, name: str | None = None) -> ServiceKeyCreated:
        self.calls.append(("create_key", ref, name))
        return ServiceKeyCreated(id="k1", name=name, prefix="mmk_ab", created_by="alice", created_at=NOW,
                                 key="mmk_abSECRET")

    def list(self, ref: str) -> list[ServiceKeyOut]:
        return [ServiceKeyOut(id="k1", name="ci", prefix="mmk_ab", created_by="alice", created_at=NOW)]

    def delete(self, ref: str, key_id: str) -> None:
        self.calls.append(("delete_key", ref, key_id))


class FakeServices:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.keys = FakeKeys(calls)


class FakeImages:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls
        self.failing: set[str] = set()

    def list(self, controller_id: str) -> ControllerImagesOut:
        if controller_id in self.failing:
            return ControllerImagesOut(controller_id=controller_id, ok=False, images=[],
                                       error={"code": "CONTROLLER_UNAVAILABLE", "message": "connection refused"})
        return ControllerImagesOut(controller_id=controller_id, images=[
            {"repository": "img", "tag": "1", "id": "sha256:1", "size": 12_000_000, "created": "2026-12-01"}])

    def _outcome(self, controller_id: str, **ok: Any) -> ImageOutcome:
        if controller_id in self.failing:
            return ImageOutcome(controller_id=controller_id, ok=False,
                                error={"code": "IMAGE_PULL_FAILED", "message": "pull access denied"})
        return ImageOutcome(controller_id=controller_id, ok=True, **ok)

    def pull(self, image: str, controllers: list[str], registry_auth: Any = None) -> list[ImageOutcome]:
        self.calls.append(("pull", image, controllers, registry_auth))
        return [self._outcome(c, image={"exists": True, "id": "sha256:1", "size": 12_000_000}) for c in controllers]

    def prune(self, controllers: list[str]) -> list[ImageOutcome]:
        self.calls.append(("prune", controllers))
        return [self._outcome(c, images_deleted=["sha256:2"], space_reclaimed=3_000_000) for c in controllers]


class FakeClient(FakeClientBase):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.model_files = FakeFiles(self.calls)
        self.services = FakeServices(self.calls)
        self.images = FakeImages(self.calls)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    return use_client(monkeypatch, FakeClient())


def test_upload_prints_the_digest_alone_on_stdout(fake: FakeClient, tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    done = run("models", "files", "upload", str(path), "--name", "w.bin")
    assert done.exit_code == 0, done.output
    assert done.stdout == DIGEST + "\n"
    assert f"models: [{{digest: {DIGEST}}}]" in done.stderr and "/app/models/w.bin" in done.stderr
    # Not a terminal: no bar, so no progress callback.
    assert fake.calls == [("upload", b"abc", "w.bin", None)]
    assert json.loads(run("models", "files", "upload", str(path), "--json").stdout)["digest"] == DIGEST


def test_upload_of_no_file_is_a_usage_error(fake: FakeClient, tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        assert run("models", "files", "upload", str(path)).exit_code == 2
    assert fake.calls == []


def test_files_list_strips_control_characters_and_delete_says_so(fake: FakeClient) -> None:
    listed = run("models", "files", "list").stdout
    assert "\x1b" not in listed and "w[31m.bin" in listed and "2.5 MB" in listed and DIGEST in listed
    assert json.loads(run("models", "files", "list", "--json").stdout)[0]["name"] == "w\x1b[31m.bin"
    assert run("models", "files", "delete", DIGEST).stdout == f"{DIGEST}: deleted\n"
    missing = run("models", "files", "delete", "sha256:x")
    assert (missing.exit_code, missing.stderr) == (1, "error: MODEL_FILE_NOT_FOUND: model file sha256:x not found\n")


def test_a_key_is_printed_once_with_a_warning_and_listed_without_it(fake: FakeClient) -> None:
    made = run("services", "keys", "create", "hello", "--name", "ci")
    assert made.exit_code == 0 and "mmk_abSECRET" in made.stdout
    assert "shown this once" in made.stderr
    assert json.loads(run("services", "keys", "create", "hello", "--json").stdout)["key"] == "mmk_abSECRET"
    listed = run("services", "keys", "list", "hello").stdout
    assert "mmk_ab" in listed and "SECRET" not in listed
    assert run("services", "keys", "delete", "hello", "k1").stdout == "hello: key k1 revoked\n"
    assert fake.calls == [("create_key", "hello", "ci"), ("create_key", "hello", None), ("delete_key", "hello", "k1")]


def test_images_list_and_a_controller_that_cannot_say(fake: FakeClient) -> None:
    listed = run("images", "list", "a")
    assert listed.exit_code == 0 and "img" in listed.stdout and "12.0 MB" in listed.stdout
    fake.images.failing = {"b"}
    down = run("images", "list", "b")
    assert (down.exit_code, down.stderr) == (1, "error: CONTROLLER_UNAVAILABLE: b: connection refused\n")


def test_pull_prints_each_outcome_and_fails_when_one_failed(fake: FakeClient) -> None:
    done = run("images", "pull", "img:1", "-c", "a", "-c", "b")
    assert done.exit_code == 0, done.output
    assert [line.split()[:2] for line in done.stdout.splitlines()[-2:]] == [["a", "ok"], ["b", "ok"]]
    fake.images.failing = {"b"}
    done = run("images", "pull", "img:1", "-c", "a", "-c", "b", "--json")
    assert done.exit_code == 1
    assert [o["ok"] for o in json.loads(done.stdout)] == [True, False]
    assert done.stderr == "error: IMAGE_PULL_FAILED: b: pull access denied\n"


def test_the_registry_password_comes_from_stdin_never_a_flag(fake: FakeClient) -> None:
    done = run("images", "pull", "img:1", "-c", "a", "--registry-user", "u", stdin="s3cret\n")
    assert done.exit_code == 0, done.output
    assert fake.calls[-1] == ("pull", "img:1", ["a"], {"username": "u", "password": "s3cret"})
    assert "s3cret" not in done.output
    assert run("images", "pull", "img:1", "-c", "a", "--registry-user", "u", stdin="").exit_code == 2
    assert run("images", "pull", "img:1", "-c", "a", "--registry-password", "x").exit_code == 2


def test_prune_names_what_it_reclaimed(fake: FakeClient) -> None:
    done = run("images", "prune", "-c", "a")
    assert done.exit_code == 0 and "1 images removed, 3.0 MB reclaimed" in done.stdout
    assert run("images", "prune").exit_code == 2  # no controller named
