"""Job runs on the real Docker engine, through the controller's API: a job that reads its input and writes
its outputs and progress (the manifest's sha256 checked against the bytes), a non-zero exit, a timeout, a
cancel, and a controller restarted while a job runs. The jobs wait for a file the test drops into their
outputs folder, so that nothing here waits on the clock."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import docker
import httpx
import uvicorn

from controller.app import create_app
from mmanager.serving import Server
from tests.controller.conftest import AUTH, Ctl, StartController, make_settings
from tests.support.poll import eventually

# The job waits for the test's go-ahead (a file in its outputs), then works.
WAIT_FOR_GO = "while [ ! -f /outputs/go ]; do sleep 0.05; done; rm /outputs/go; "
# A job that runs until it is stopped, and stops at once when told (a shell as PID 1 ignores SIGTERM).
FOREVER = "trap 'exit 143' TERM; while true; do sleep 0.05; done"


def job(image: str, attempt: str, script: str, **fields: Any) -> dict[str, Any]:
    return {"job_id": f"job-{attempt}", "attempt_id": attempt, "number": 1, "name": attempt, "image": image,
            "command": ["sh", "-c", script], **fields}


def dirs(tmp_path: Path) -> dict[str, Path]:
    return {"job_dir": tmp_path / "jobs", "model_cache_dir": tmp_path / "models"}


def cache_file(models: Path, data: bytes) -> str:
    """A file the model cache holds already (as a sync from the hub would have left it)."""
    hexdigest = hashlib.sha256(data).hexdigest()
    (models / "sha256").mkdir(parents=True, exist_ok=True)
    (models / "sha256" / hexdigest).write_bytes(data)
    return f"sha256:{hexdigest}"


async def post(ctl: Ctl, body: dict[str, Any]) -> dict[str, Any]:
    response = await ctl.client.post("/jobs/", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def state(ctl: Ctl, attempt: str) -> dict[str, Any]:
    response = await ctl.client.get(f"/jobs/{attempt}")
    assert response.status_code == 200, response.text
    return response.json()


async def ended(ctl: Ctl, attempt: str, within: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        info = await state(ctl, attempt)
        return info if info["collectable"] else {}

    return await eventually(check, within=within, what=f"job run {attempt} collected", interval=0.05)


def go(ctl: Ctl, attempt: str) -> None:
    (ctl.settings.job_dir / attempt / "outputs" / "go").touch()


async def test_jobs_read_inputs_write_outputs_and_end_as_they_should(
    start_controller: StartController, example_image: str, tmp_path: Path
) -> None:
    ctl = await start_controller(**dirs(tmp_path))
    data = b"sequence,label\nacgt,promoter\n"
    digest = cache_file(ctl.settings.model_cache_dir, data)
    work = (
        "echo waiting; "
        'echo "{\\"done\\": 1, \\"total\\": 2, \\"unit\\": \\"steps\\"}" > "$MMANAGER_PROGRESS_FILE"; '
        + WAIT_FOR_GO
        + "mkdir -p /outputs/tables && tr a-z A-Z < /inputs/data/train.csv > /outputs/tables/upper.csv && "
        "echo \"attempt $MMANAGER_ATTEMPT of $MMANAGER_JOB_ID\" > /outputs/who.txt && "
        "ln -s /etc/passwd /outputs/link && echo finished"
    )
    await post(ctl, job(example_image, "works", work, inputs=[{"digest": digest, "path": "data/train.csv"}]))
    await post(ctl, job(example_image, "fails", "echo oops >&2; exit 3"))
    await post(ctl, job(example_image, "slow", FOREVER, timeout=1))
    cancelled = await post(ctl, job(example_image, "cancel", FOREVER))

    # While it runs: its progress, and Docker's log.
    async def progress() -> dict[str, Any]:
        return (await state(ctl, "works"))["progress"] or {}

    seen: dict[str, Any] = await eventually(progress, within=10, what="the job's progress")
    assert seen == {"done": 1, "total": 2, "unit": "steps", "rate": None, "message": None}
    running_log = await ctl.client.get("/jobs/works/logs")
    assert running_log.text == "waiting\n"
    assert cancelled["state"] == "running"
    stopped = await ctl.client.post("/jobs/cancel/cancel")
    assert stopped.json()["state"] == "cancelled" and stopped.json()["collectable"]
    # A followed log goes on until the job ends (Docker's while it runs, the kept one if it ended first).
    follow = asyncio.create_task(ctl.client.get("/jobs/works/logs", params={"follow": "true"}))
    go(ctl, "works")
    assert (await follow).text == "waiting\nfinished\n"

    works = await ended(ctl, "works")
    assert (works["state"], works["exit_code"], works["error"]) == ("exited", 0, None)
    manifest = (await ctl.client.get("/jobs/works/outputs")).json()["files"]
    upper = data.upper()
    assert manifest == [
        {"path": "tables/upper.csv", "size": len(upper), "sha256": hashlib.sha256(upper).hexdigest()},
        {"path": "who.txt", "size": len(b"attempt 1 of job-works\n"),
         "sha256": hashlib.sha256(b"attempt 1 of job-works\n").hexdigest()},
    ]
    fetched = await ctl.client.get("/jobs/works/outputs/tables/upper.csv")
    assert fetched.content == upper and hashlib.sha256(fetched.content).hexdigest() == manifest[0]["sha256"]
    assert (await ctl.client.get("/jobs/works/logs")).text == "waiting\nfinished\n"

    fails = await ended(ctl, "fails")
    assert (fails["state"], fails["exit_code"]) == ("exited", 3)
    assert (await ctl.client.get("/jobs/fails/logs")).text == "oops\n"
    slow = await ended(ctl, "slow")
    assert (slow["state"], slow["exit_code"]) == ("timed_out", 143) and "timeout" in slow["error"]
    assert (await state(ctl, "cancel"))["state"] == "cancelled"

    # Every ended container is gone; deleting a run removes its folder.
    assert await ctl.app.state.runtime.list_containers(all=True) == []
    assert (await ctl.client.delete("/jobs/works")).status_code == 204
    assert not (ctl.settings.job_dir / "works").exists()

    # What it left stays in this server's model cache: a next job mounts it, with no hub to fetch it from.
    assert ctl.settings.hub_url is None
    await post(ctl, job(example_image, "next", "cat /inputs/upper.csv",
                        inputs=[{"digest": f"sha256:{manifest[0]['sha256']}", "path": "upper.csv"}]))
    following = await ended(ctl, "next")
    assert (following["state"], following["exit_code"], following["error"]) == ("exited", 0, None)
    assert (await ctl.client.get("/jobs/next/logs")).content == upper


@asynccontextmanager
async def controller(server_id: str, tmp_path: Path) -> AsyncIterator[Ctl]:
    settings = make_settings(server_id, docker_timeout=20, **dirs(tmp_path))
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://controller", headers=AUTH, timeout=30) as client:
        yield Ctl(app, client, settings)


async def test_a_restarted_controller_finds_a_running_job_again(
    server_id: str, example_image: str, tmp_path: Path
) -> None:
    async with controller(server_id, tmp_path) as first:
        script = "echo before; " + WAIT_FOR_GO + "echo after > /outputs/done"
        started = await post(first, job(example_image, "long", script))
    async with controller(server_id, tmp_path) as second:
        async def running() -> dict[str, Any]:
            info = await state(second, "long")
            return info if info["state"] == "running" else {}

        again: dict[str, Any] = await eventually(running, within=10, what="the run picked up again")
        assert again["container_id"] == started["container_id"]
        go(second, "long")
        done = await ended(second, "long")
        assert (done["state"], done["exit_code"]) == ("exited", 0)
        files = (await second.client.get("/jobs/long/outputs")).json()["files"]
        assert [f["path"] for f in files] == ["done"]
        assert (await second.client.get("/jobs/long/logs")).text == "before\n"


NON_ROOT_IMAGE = "mmanager/job-non-root-test:latest"


async def test_a_job_running_as_a_non_root_user_writes_its_outputs_and_progress_in_private_folders(
    start_controller: StartController, example_image: str, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """The job folders are 0700 on the host; the job, as an unprivileged user of its image, still writes
    ``/outputs`` and its progress file, and runs without the capabilities a job never needs."""
    dockerfile = f"FROM {example_image}\nUSER 10001:10001\n".encode()
    docker_client.images.build(fileobj=io.BytesIO(dockerfile), tag=NON_ROOT_IMAGE, rm=True)
    ctl = await start_controller(**dirs(tmp_path))
    script = ('echo "{\\"done\\": 1}" > "$MMANAGER_PROGRESS_FILE"; ' + WAIT_FOR_GO
              + "mkdir /outputs/sub && id -u > /outputs/sub/uid.txt")
    started = await post(ctl, job(NON_ROOT_IMAGE, "nonroot", script))
    host = docker_client.api.inspect_container(started["container_id"])["HostConfig"]
    assert {"MKNOD", "SETUID", "SETGID", "FSETID"} <= set(host["CapDrop"] or [])
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert (ctl.settings.job_dir.stat().st_mode & 0o777, (ctl.settings.job_dir / "nonroot").stat().st_mode & 0o777) \
        == (0o700, 0o700)

    async def progress() -> dict[str, Any]:
        return (await state(ctl, "nonroot"))["progress"] or {}

    assert (await eventually(progress, within=10, what="the job's progress"))["done"] == 1
    go(ctl, "nonroot")
    done = await ended(ctl, "nonroot")
    assert (done["state"], done["exit_code"]) == ("exited", 0), done
    got = await ctl.client.get("/jobs/nonroot/outputs/sub/uid.txt")
    assert got.status_code == 200 and got.text == "10001\n"
    assert (await ctl.client.delete("/jobs/nonroot")).status_code == 204
    assert not (ctl.settings.job_dir / "nonroot").exists()


async def test_a_stopping_controller_answers_its_long_polls_at_once(start_controller: StartController,
                                                                   tmp_path: Path) -> None:
    """uvicorn waits for the calls in flight before it stops: a long poll of the job runs (the hub's, up to a
    minute) must not hold a controller's stop for its whole wait."""
    ctl = await start_controller(**dirs(tmp_path))
    jobs = ctl.app.state.jobs
    server = Server(uvicorn.Config(ctl.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"),
                    closing=jobs.closing)
    serving = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, 10, "the controller listening", interval=0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    polling = asyncio.Event()
    listing = jobs.list

    async def watched(since: int | None = None, wait: float = 0) -> Any:
        polling.set()
        return await listing(since, wait)

    jobs.list = watched
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=90) as client:
        version = (await client.get("/jobs/")).json()["version"]
        polling.clear()
        poll = asyncio.create_task(client.get("/jobs/", params={"since": version, "wait": 60}))
        await asyncio.wait_for(polling.wait(), 10)
        server.should_exit = True
        answer = await asyncio.wait_for(poll, 10)
        await asyncio.wait_for(serving, 10)
    assert answer.status_code == 200 and answer.json()["version"] == version
