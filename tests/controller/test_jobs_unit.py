"""The controller's job runner over the in-memory FakeRuntime: runs made idempotently with their labels,
folders and inputs; refusals that leave nothing behind; an ended run's log, outputs manifest and result
kept until deleted; the long poll, the timeout, cancel, progress, the restart pick-up and the hub's
stale-attempt stop orders. The job's own side (what it reads and writes) is played here on the host
folders its container would have mounted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller import jobs as jobs_module
from controller.app import create_app
from controller.errors import DockerError, NotFound
from controller.fake import FakeContainer, FakeRuntime
from controller.jobs import JobRunner
from examples.images import EXAMPLE_IMAGE
from mmanager.wire import Heartbeat, JobRunInfo, StopOrder
from tests.controller.conftest import AUTH, Ctl, StartController, make_settings
from tests.controller.test_controller_heartbeat import HUB, FakeHub
from tests.support.poll import eventually


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def job(attempt: str = "a1", number: int = 1, **fields: Any) -> dict[str, Any]:
    return {"job_id": "job-1", "attempt_id": attempt, "number": number, "name": "features", "image": EXAMPLE_IMAGE,
            "command": ["sh", "-c", "work"], **fields}


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Any]:
    return {"job_dir": tmp_path / "jobs", "model_cache_dir": tmp_path / "models"}


@pytest.fixture
async def ctl(start_fake: StartController, dirs: dict[str, Any]) -> Ctl:
    return await start_fake(**dirs)


def cache_file(ctl: Ctl, data: bytes) -> str:
    """A file the model cache holds already (as a sync would have left it)."""
    digest = digest_of(data)
    path = ctl.settings.model_cache_dir / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


async def run(ctl: Ctl, **fields: Any) -> dict[str, Any]:
    response = await ctl.client.post("/jobs/", json=job(**fields))
    assert response.status_code == 201, response.text
    return response.json()


def container(fake: FakeRuntime, info: dict[str, Any]) -> FakeContainer:
    return fake.containers[info["container_id"]]


def mounted(c: FakeContainer, target: str) -> Path:
    return Path(next(m.source for m in c.spec.own_mounts if m.target == target))


async def state(ctl: Ctl, attempt: str) -> dict[str, Any]:
    response = await ctl.client.get(f"/jobs/{attempt}")
    assert response.status_code == 200, response.text
    return response.json()


async def collectable(ctl: Ctl, attempt: str) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        info = await state(ctl, attempt)
        return info if info["collectable"] else {}

    return await eventually(check, what=f"job run {attempt} collectable")


async def test_a_run_makes_one_labelled_container_with_its_folders_and_inputs(ctl: Ctl, fake: FakeRuntime) -> None:
    weights = cache_file(ctl, b"weights")
    body = job(inputs=[{"digest": weights, "path": "model/weights.bin"}, {"digest": weights, "path": "copy.bin"}],
               environment={"SEED": "7"}, memory_limit="256m", cpu_limit=0.5, timeout=600,
               registry_auth={"username": "robot", "password": "s3cret-registry-pass"})
    first = await ctl.client.post("/jobs", json=body)
    assert first.status_code == 201, first.text
    info = JobRunInfo.model_validate(first.json())
    assert (info.state, info.number, info.collectable, info.exit_code) == ("running", 1, False, None)

    c = fake.containers[info.container_id or ""]
    labels = c.spec.labels
    assert labels["mmanager.job"] == "job-1" and labels["mmanager.attempt"] == "a1"
    assert labels["mmanager.epoch"] == "1" and labels["mmanager.managed"] == "true"
    assert labels["mmanager.models"] == weights.removeprefix("sha256:")
    assert "mmanager.service" not in labels
    assert c.spec.restart_policy == {"Name": "no", "MaximumRetryCount": 0}
    assert c.spec.command == ["sh", "-c", "work"]
    assert c.spec.mem_limit == 256 * 1024**2 and c.spec.nano_cpus == 500_000_000
    env = c.spec.environment
    assert env["SEED"] == "7" and env["MMANAGER_JOB_ID"] == "job-1" and env["MMANAGER_ATTEMPT"] == "1"
    assert env["MMANAGER_PROGRESS_FILE"] == "/run/mmanager/progress.json"
    folder = ctl.settings.job_dir / "a1"
    mounts = {m.target: (m.source, m.read_only) for m in c.spec.own_mounts}
    cached = str(ctl.settings.model_cache_dir / "sha256" / weights.removeprefix("sha256:"))
    assert mounts == {"/outputs": (str(folder / "outputs"), False), "/run/mmanager": (str(folder / "progress"), False),
                      "/inputs/model/weights.bin": (cached, True), "/inputs/copy.bin": (cached, True)}
    # The request is kept for a restart, without the registry login.
    saved = (folder / "request.json").read_text()
    assert json.loads(saved)["attempt_id"] == "a1" and "s3cret" not in saved and "robot" not in saved

    again = await ctl.client.post("/jobs/", json=body)
    assert again.status_code == 200 and again.json()["container_id"] == info.container_id
    assert fake.creates == 1


async def test_bad_requests_are_refused_and_leave_nothing(ctl: Ctl, fake: FakeRuntime) -> None:
    for path in ("../escape", "/etc/passwd", "a//b", "a/./b", "a/"):
        response = await ctl.client.post("/jobs/", json=job(inputs=[{"digest": digest_of(b"x"), "path": path}]))
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "INVALID_PATH"
    twice = [{"digest": digest_of(b"x"), "path": "a"}, {"digest": digest_of(b"y"), "path": "a/b"}]
    response = await ctl.client.post("/jobs/", json=job(inputs=twice))
    assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_PATH"
    response = await ctl.client.post("/jobs/", json=job(attempt="../up"))
    assert response.status_code == 400
    # An input this controller cannot fetch (no hub): no container, no folder, no run.
    response = await ctl.client.post("/jobs/", json=job(inputs=[{"digest": digest_of(b"x"), "path": "x"}]))
    assert response.status_code == 424, response.text
    assert not fake.containers and [p.name for p in ctl.settings.job_dir.iterdir() if p.name != ".numbers"] == [".tmp"]
    assert not list((ctl.settings.job_dir / ".numbers").iterdir())  # its number is not used up either
    assert (await ctl.client.get("/jobs/")).json()["runs"] == []

    await run(ctl, attempt="a2", number=2)
    stale = await ctl.client.post("/jobs/", json=job(attempt="a1", number=1))
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "STALE_EPOCH"
    assert len(fake.containers) == 1


async def test_an_ended_run_keeps_its_log_outputs_and_result_until_deleted(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl)
    c = container(fake, info)
    early = await ctl.client.get("/jobs/a1/outputs")
    assert early.status_code == 409 and early.json()["error"]["code"] == "JOB_RUNNING"
    outputs = mounted(c, "/outputs")
    (outputs / "tables").mkdir()
    (outputs / "tables" / "features.csv").write_bytes(b"a,b\n1,2\n")
    (outputs / "summary.json").write_bytes(b"{}")
    os.symlink("/etc/passwd", outputs / "leak")
    os.mkfifo(outputs / "pipe")
    listed = await ctl.client.get("/jobs/")
    before = listed.json()["version"]

    fake.exit(c.id, 0, "step 1\nstep 2")
    ended = await collectable(ctl, "a1")
    assert (ended["state"], ended["exit_code"], ended["error"]) == ("exited", 0, None)
    assert ended["finished_at"]
    assert c.id not in fake.containers  # removed once its result was kept
    assert (await ctl.client.get("/jobs/")).json()["version"] > before

    manifest = (await ctl.client.get("/jobs/a1/outputs")).json()
    assert manifest["files"] == [
        {"path": "summary.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        {"path": "tables/features.csv", "size": 8, "sha256": hashlib.sha256(b"a,b\n1,2\n").hexdigest()},
    ]
    got = await ctl.client.get("/jobs/a1/outputs/tables/features.csv")
    assert got.status_code == 200 and got.content == b"a,b\n1,2\n"
    # Encoded, so that they reach the controller as they are.
    for bad in ("tables/%2E%2E/%2E%2E/request.json", "%2Fetc%2Fpasswd", "tables//features.csv"):
        refused = await ctl.client.get(f"/jobs/a1/outputs/{bad}")
        assert refused.status_code == 400, (bad, refused.text)
    assert (await ctl.client.get("/jobs/a1/outputs/leak")).status_code == 404
    log = await ctl.client.get("/jobs/a1/logs")
    assert log.text.endswith("step 1\nstep 2\n") and ended["log_bytes"] == len(log.content)
    assert (await ctl.client.get("/jobs/a1/logs", params={"lines": 1})).text == "step 2\n"
    assert (await ctl.client.get("/jobs/a1/logs", params={"follow": "true"})).text == log.text

    folder = ctl.settings.job_dir / "a1"
    assert {"result.json", "outputs.json", "log.txt"} <= {p.name for p in folder.iterdir()}
    assert (await ctl.client.delete("/jobs/a1/")).status_code == 204
    assert not folder.exists()
    assert (await ctl.client.get("/jobs/a1")).status_code == 404
    assert (await ctl.client.delete("/jobs/a1")).status_code == 404


async def test_a_non_zero_exit_and_progress(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl)
    c = container(fake, info)
    progress = mounted(c, "/run/mmanager") / "progress.json"
    progress.write_text('{"done": 3, "total": 10, "unit": "rows"')  # half-written: ignored
    assert (await state(ctl, "a1"))["progress"] is None
    progress.write_text('{"done": 3, "total": 10, "unit": "rows", "rate": 1.5}')
    assert (await state(ctl, "a1"))["progress"] == {"done": 3, "total": 10, "unit": "rows", "rate": 1.5,
                                                   "message": None}
    fake.exit(c.id, 3, "boom")
    ended = await collectable(ctl, "a1")
    assert (ended["state"], ended["exit_code"]) == ("exited", 3)
    assert ended["progress"]["done"] == 3


async def test_the_long_poll_answers_on_a_change(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl)
    version = (await ctl.client.get("/jobs")).json()["version"]
    quiet = await ctl.client.get("/jobs", params={"since": version, "wait": 0.05})
    assert quiet.json()["version"] == version
    poll = asyncio.create_task(ctl.client.get("/jobs", params={"since": version, "wait": 30}))
    await asyncio.sleep(0)
    fake.exit(info["container_id"], 0)
    answered = (await poll).json()
    assert answered["version"] > version and answered["runs"][0]["attempt_id"] == "a1"
    # A job rewriting its progress is a change too.
    other = await run(ctl, attempt="a2", number=2)
    version = answered["version"]
    poll = asyncio.create_task(ctl.client.get("/jobs", params={"since": version, "wait": 30}))
    await asyncio.sleep(0)
    (mounted(container(fake, other), "/run/mmanager") / "progress.json").write_text('{"done": 1}')
    moved = (await poll).json()
    assert moved["version"] > version
    assert next(r for r in moved["runs"] if r["attempt_id"] == "a2")["progress"]["done"] == 1
    # A version from before a restart (higher or lower than this one) is answered at once.
    assert (await ctl.client.get("/jobs", params={"since": version + 10**6, "wait": 30})).status_code == 200


async def test_a_timeout_stops_the_run(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl, timeout=0.1)
    ended = await collectable(ctl, "a1")
    assert (ended["state"], ended["exit_code"]) == ("timed_out", 143)
    assert "timeout" in ended["error"]
    assert info["container_id"] not in fake.containers


async def test_cancel_stops_it_and_keeps_what_it_left(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl)
    (mounted(container(fake, info), "/outputs") / "partial.txt").write_text("half")
    cancelled = await ctl.client.post("/jobs/a1/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["state"], cancelled.json()["collectable"]) == ("cancelled", True)
    assert [f["path"] for f in (await ctl.client.get("/jobs/a1/outputs")).json()["files"]] == ["partial.txt"]
    again = await ctl.client.post("/jobs/a1/cancel")
    assert again.json()["state"] == "cancelled"


@asynccontextmanager
async def controller(fake: FakeRuntime, dirs: dict[str, Any]) -> AsyncIterator[Ctl]:
    settings = make_settings(fake.server_id, **dirs)
    app = create_app(settings, fake)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://controller", headers=AUTH) as client:
        yield Ctl(app, client, settings)


async def test_a_restarted_controller_picks_every_run_up_again(fake: FakeRuntime, dirs: dict[str, Any]) -> None:
    async with controller(fake, dirs) as first:
        running = await run(first, attempt="r1", timeout=3600)
        exits = await run(first, attempt="r2", number=2)
        vanishes = await run(first, attempt="r3", number=3)
        unstarted = await run(first, attempt="r5", number=4)
        done = await run(first, attempt="r4", number=5)
        fake.exit(done["container_id"], 0)
        await collectable(first, "r4")
    # While the controller is down: one ends, one's container is removed behind its back.
    fake.exit(exits["container_id"], 5, "bye")
    await fake.remove(vanishes["container_id"], force=True)
    fake.containers[unstarted["container_id"]].status = "created"  # as if the start never came

    async with controller(fake, dirs) as second:
        r2 = await collectable(second, "r2")
        assert (r2["state"], r2["exit_code"]) == ("exited", 5)
        assert (await second.client.get("/jobs/r2/logs")).text.endswith("bye\n")
        r3 = await collectable(second, "r3")
        assert r3["state"] == "failed" and "vanished" in r3["error"]
        # Never started: dropped, so that the hub places it again without counting a retry.
        assert (await second.client.get("/jobs/r5")).status_code == 404
        assert unstarted["container_id"] not in fake.containers and not (dirs["job_dir"] / "r5").exists()
        r4 = await state(second, "r4")
        assert (r4["state"], r4["collectable"]) == ("exited", True)
        r1 = await state(second, "r1")
        assert (r1["state"], r1["collectable"], r1["container_id"]) == ("running", False, running["container_id"])
        # Watched again: its end is collected.
        fake.exit(running["container_id"], 0)
        assert (await collectable(second, "r1"))["exit_code"] == 0
        # The attempt numbers seen before are remembered.
        stale = await second.client.post("/jobs/", json=job(attempt="old", number=2))
        assert stale.status_code == 409 and stale.json()["error"]["code"] == "STALE_EPOCH"


async def test_a_stale_attempt_order_drops_the_run(start_fake: StartController, fake: FakeRuntime,
                                                  dirs: dict[str, Any]) -> None:
    hub = FakeHub()
    ctl = await start_fake(hub_transport=hub.transport(), hub_url=HUB, **dirs)
    await eventually(lambda: ctl.app.state.containers.sync.in_sync, within=10, what="first round trip")
    stale = await run(ctl, attempt="old")
    kept = await run(ctl, attempt="new", number=2)

    def reported(beat: Heartbeat) -> bool:
        return any(c.attempt_id == "old" and c.job_id == "job-1" for c in beat.containers)

    await eventually(lambda: any(reported(b) for b in hub.beats), within=10, what="the job container in a heartbeat")
    order: Callable[[Heartbeat], list[StopOrder]] = lambda beat: [  # noqa: E731
        StopOrder(container_id=c.container_id, reason="stale_attempt", attempt_id=c.attempt_id)
        for c in beat.containers if c.attempt_id == "old"]
    hub.orders = order
    await eventually(lambda: stale["container_id"] not in fake.containers, within=10, what="the stale attempt removed")
    await eventually(lambda: not (ctl.settings.job_dir / "old").exists(), within=10, what="its folder removed")
    assert (await ctl.client.get("/jobs/old")).status_code == 404
    assert (await state(ctl, "new"))["state"] == "running" and kept["container_id"] in fake.containers


async def test_a_job_folder_that_cannot_be_written_refuses_the_run(start_fake: StartController, fake: FakeRuntime,
                                                                   tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the job folder should be")
    ctl = await start_fake(job_dir=blocked, model_cache_dir=tmp_path / "models")
    response = await ctl.client.post("/jobs/", json=job())
    assert response.status_code == 507 and response.json()["error"]["code"] == "JOB_DIR_UNWRITABLE"
    assert not fake.containers and (await ctl.client.get("/jobs")).json()["runs"] == []


# -- what a job may do to its controller, and failures on the controller's side ---------------------------


async def test_a_progress_file_that_is_no_plain_file_or_not_finite_reads_as_none(ctl: Ctl, fake: FakeRuntime,
                                                                               tmp_path: Path) -> None:
    info = await run(ctl)
    progress = mounted(container(fake, info), "/run/mmanager") / "progress.json"
    # A FIFO nobody writes to: a plain open would block the reading thread for good.
    os.mkfifo(progress)
    assert (await asyncio.wait_for(state(ctl, "a1"), 10))["progress"] is None
    progress.unlink()
    # A link to a file of the host's is not followed.
    elsewhere = tmp_path / "host.json"
    elsewhere.write_text('{"done": 5}')
    os.symlink(elsewhere, progress)
    assert (await state(ctl, "a1"))["progress"] is None
    progress.unlink()
    for text in ('{"done": NaN}', '{"done": 1, "total": Infinity}', '{"done": 1e999}', " " * (64 * 1024) + "{}"):
        progress.write_text(text)
        assert (await state(ctl, "a1"))["progress"] is None, text
    listed = await ctl.client.get("/jobs/")
    assert listed.status_code == 200 and "NaN" not in listed.text and listed.json()["runs"][0]["progress"] is None
    progress.write_text('{"done": 2}')
    assert (await state(ctl, "a1"))["progress"]["done"] == 2


async def test_job_folders_are_private_and_the_container_gets_fewer_capabilities(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl)
    root = ctl.settings.job_dir
    folder = root / "a1"

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert (mode(root), mode(folder), mode(folder / "request.json")) == (0o700, 0o700, 0o600)
    # Writable by whatever user the image runs as, but reached only through the private folders.
    assert (mode(folder / "outputs"), mode(folder / "progress")) == (0o777, 0o777)
    spec = container(fake, info).spec
    assert {"MKNOD", "SETUID", "SETGID", "FSETID"} <= set(spec.cap_drop)
    assert "no-new-privileges:true" in spec.security_opt
    fake.exit(info["container_id"], 0)
    await collectable(ctl, "a1")
    assert {mode(folder / name) for name in ("log.txt", "outputs.json", "result.json")} == {0o600}


async def test_the_pick_up_is_tried_again_after_any_error(fake: FakeRuntime, dirs: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.jobs.RETRY_PAUSE", 0.01)
    async with controller(fake, dirs) as first:
        running = await run(first, attempt="r1")
        gone = await run(first, attempt="r2", number=2)
    scans = 0
    original_scan = JobRunner._scan

    def scan(self: JobRunner) -> Any:
        nonlocal scans
        scans += 1
        if scans == 1:
            raise PermissionError("the job folder cannot be read")
        return original_scan(self)

    monkeypatch.setattr(JobRunner, "_scan", scan)
    # Listed, then gone when inspected: vanished, not a failed pick-up.
    original_get = fake.get_container

    async def get_container(container_id: str) -> Any:
        if container_id == gone["container_id"]:
            raise NotFound("no such container")
        return await original_get(container_id)

    monkeypatch.setattr(fake, "get_container", get_container)
    async with controller(fake, dirs) as second:
        assert (await state(second, "r1"))["container_id"] == running["container_id"]
        r2 = await collectable(second, "r2")
        assert r2["state"] == "failed" and "vanished" in r2["error"]
        assert scans == 2


async def test_a_full_disk_while_keeping_what_a_run_left_is_tried_again(ctl: Ctl, fake: FakeRuntime,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.jobs.RETRY_PAUSE", 0.01)
    info = await run(ctl)
    runner: JobRunner = ctl.app.state.jobs
    seen_between: list[str] = []
    original = jobs_module.manifest

    def manifest(outputs: Path) -> Any:
        if not seen_between:
            seen_between.append("failed")
            raise OSError(28, "No space left on device")
        # The failed try changed nothing of the run: no ended state that is never collected.
        seen_between.append(runner.runs["a1"].state)
        return original(outputs)

    monkeypatch.setattr(jobs_module, "manifest", manifest)
    fake.exit(info["container_id"], 0, "done")
    ended = await collectable(ctl, "a1")
    assert (ended["state"], ended["exit_code"]) == ("exited", 0)
    assert seen_between == ["failed", "running"]


async def test_a_deleted_attempt_is_not_run_again_even_after_a_restart(fake: FakeRuntime, dirs: dict[str, Any]) -> None:
    async with controller(fake, dirs) as first:
        info = await run(first, number=4)
        fake.exit(info["container_id"], 0)
        await collectable(first, "a1")
        assert (await first.client.delete("/jobs/a1")).status_code == 204
        for body in (job(number=4), job(attempt="b1", number=3)):
            again = await first.client.post("/jobs/", json=body)
            assert again.status_code == 409 and again.json()["error"]["code"] == "STALE_EPOCH", body
        runner: JobRunner = first.app.state.jobs
        assert not runner._locks  # none kept once no call holds one
    async with controller(fake, dirs) as second:
        again = await second.client.post("/jobs/", json=job(number=4))
        assert again.status_code == 409 and again.json()["error"]["code"] == "STALE_EPOCH"
        await run(second, attempt="a5", number=5)
    assert fake.creates == 2


async def test_a_progress_change_reaches_a_long_poll_whoever_read_the_list_first(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl)
    version = (await ctl.client.get("/jobs/")).json()["version"]
    (mounted(container(fake, info), "/run/mmanager") / "progress.json").write_text('{"done": 1}')
    # Another reader (a second hub replica, an operator) lists in between.
    await ctl.client.get("/jobs/")
    moved = (await ctl.client.get("/jobs/", params={"since": version, "wait": 5})).json()
    assert moved["version"] > version and moved["runs"][0]["progress"]["done"] == 1


async def test_an_attempt_whose_container_was_never_made_is_dropped_after_a_restart(
        fake: FakeRuntime, dirs: dict[str, Any]) -> None:
    async with controller(fake, dirs) as first:
        await run(first)
    # As the controller killed during the pull leaves it: the folder, no container.
    folder = dirs["job_dir"] / "a1"
    (folder / "container.json").unlink()
    fake.containers.clear()
    async with controller(fake, dirs) as second:
        assert (await second.client.get("/jobs/a1")).status_code == 404
        assert not folder.exists()


async def test_a_cancel_waits_for_a_delete_in_progress(ctl: Ctl, fake: FakeRuntime) -> None:
    await run(ctl)
    runner: JobRunner = ctl.app.state.jobs
    lock = runner._lock("a1")
    async with lock:
        cancel = asyncio.create_task(ctl.client.post("/jobs/a1/cancel"))
        await eventually(lambda: bool(lock._waiters), what="the cancel waiting for the attempt's lock")
        await runner._drop(runner.runs["a1"])  # what a DELETE does under the lock
    response = await cancel
    assert response.status_code == 404, response.text
    assert not (ctl.settings.job_dir / "a1").exists()


async def test_a_failed_start_keeps_the_folder_of_a_container_that_could_not_be_removed(
        ctl: Ctl, fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.failing_images.add(EXAMPLE_IMAGE)

    async def remove(container_id: str, force: bool) -> None:
        raise DockerError("the engine did not answer in time")

    monkeypatch.setattr(fake, "remove", remove)
    response = await ctl.client.post("/jobs/", json=job())
    assert response.status_code == 422 and response.json()["error"]["code"] == "START_FAILED", response.text
    assert "could not be removed" in response.json()["error"]["message"]
    folder = ctl.settings.job_dir / "a1"
    assert len(fake.containers) == 1 and folder.is_dir()
    # The hub's stale-attempt order for its container takes the folder with it.
    runner: JobRunner = ctl.app.state.jobs
    assert await runner.discard("a1") is False
    assert not folder.exists()


async def test_outputs_over_the_limits_fail_the_run_and_the_manifest_is_read_once(
        ctl: Ctl, fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "MAX_OUTPUT_FILES", 3)
    monkeypatch.setattr(jobs_module, "MAX_OUTPUT_BYTES", 100)
    many = await run(ctl, attempt="many")
    big = await run(ctl, attempt="big", number=2)
    fits = await run(ctl, attempt="fits", number=3)
    for index in range(4):
        (mounted(container(fake, many), "/outputs") / f"{index}.txt").write_text("x")
    (mounted(container(fake, big), "/outputs") / "big.bin").write_bytes(b"x" * 101)
    (mounted(container(fake, fits), "/outputs") / "ok.txt").write_text("ok")
    for info in (many, big, fits):
        fake.exit(info["container_id"], 0)
    ended = await collectable(ctl, "many")
    assert ended["state"] == "failed" and "more than 3 output files" in ended["error"]
    assert (await ctl.client.get("/jobs/many/outputs")).json()["files"] == []
    ended = await collectable(ctl, "big")
    assert ended["state"] == "failed" and "more than 100 bytes" in ended["error"]
    assert (await collectable(ctl, "fits"))["state"] == "exited"
    (ctl.settings.job_dir / "fits" / "outputs.json").unlink()  # the run's manifest is held, not read per file
    assert (await ctl.client.get("/jobs/fits/outputs/ok.txt")).content == b"ok"
    assert [f["path"] for f in (await ctl.client.get("/jobs/fits/outputs")).json()["files"]] == ["ok.txt"]


async def test_the_kept_log_is_the_bytes_the_job_wrote(ctl: Ctl, fake: FakeRuntime) -> None:
    info = await run(ctl)
    fake.exit(info["container_id"], 0, "caf\udcff")  # the byte 0xff: not UTF-8
    ended = await collectable(ctl, "a1")
    kept = (ctl.settings.job_dir / "a1" / "log.txt").read_bytes()
    assert kept.endswith(b"caf\xff\n") and ended["log_bytes"] == len(kept)
    assert (await ctl.client.get("/jobs/a1/logs")).content == kept
