"""The SDK's jobs, artifacts and pipelines (mmanager.client.jobs) against scripted hubs (httpx.MockTransport):
the requests each call sends, names resolved to the caller's newest record, waits that poll to a final
status, downloads that land whole and checked or not at all."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.job_schemas import JobOut, JobSpec
from mmanager.client import ApiError, AsyncClient, Client
from mmanager.client import jobs as jobs_module

JID, JID2, AID, PID = "a" * 32, "b" * 32, "c" * 32, "d" * 32
NOW = "2026-12-07T10:00:00Z"
ME = {"username": "alice", "admin": False}
DATA = b"hello outputs\n" * 100


def job(status: str = "pending", id: str = JID, name: str = "train", created: str = NOW, **extra: Any) -> dict[str, Any]:
    return {"id": id, "name": name, "owner": "alice", "spec": {"name": name, "image": "img"}, "status": status,
            "priority": 0, "retries": 0, "created_at": created, **extra}


def artifact(path: str = "out/result.txt", data: bytes = DATA, id: str = AID, **extra: Any) -> dict[str, Any]:
    return {"id": id, "path": path, "size": len(data), "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
            "owner": "alice", "job_id": JID, "attempt": 1, "url": f"/api/artifacts/{id}/content",
            "created_at": NOW, **extra}


def pipeline(status: str = "running", steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": PID, "name": "feat", "owner": "alice", "spec": {}, "status": status, "steps": steps or [],
            "created_at": NOW, "updated_at": NOW}


Handler = Callable[[httpx.Request], httpx.Response]


class Hub:
    """Answers by (method, path), in turn for a list; remembers each request."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.seen: list[str] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        query = request.url.query.decode()
        self.seen.append(f"{request.method} {request.url.path}" + (f"?{query}" if query else ""))
        self.bodies.append(request.read())
        answer = self.answers[(request.method, request.url.path)]
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)

    def client(self) -> Client:
        return Client(url="http://hub", token="t", transport=httpx.MockTransport(self))


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "JOB_POLL_FIRST", 0.0)
    monkeypatch.setattr(jobs_module, "JOB_POLL_MOST", 0.0)


def not_found(code: str) -> httpx.Response:
    return httpx.Response(404, json={"error": {"code": code, "message": "not found"}})


def test_submit_sends_the_spec_with_its_wire_names_and_waits_to_a_final_status() -> None:
    hub = Hub({("POST", "/api/jobs"): job(), ("GET", f"/api/jobs/{JID}"): [
        job("pending", status_message="no controller has 1 free GPU"),
        job("running", progress={"done": 10, "total": 40, "unit": "records"}),
        job("failed", exit_code=3)]})
    spec = JobSpec.model_validate({"name": "train", "image": "img", "command": ["python", "t.py"],
                                   "inputs": [{"job": JID2, "path": "x.jsonl", "as": "in.jsonl"}]})
    seen: list[JobOut] = []
    with hub.client() as c:
        done = c.jobs.submit(spec, wait=True, progress=seen.append)
    body = json.loads(hub.bodies[0])
    assert body["inputs"] == [{"job": JID2, "path": "x.jsonl", "as": "in.jsonl"}] and body["command"] == ["python", "t.py"]
    # A failed job is the answer, not an error: the caller reads its status.
    assert (done.status, done.exit_code) == ("failed", 3)
    assert [j.status for j in seen] == ["pending", "running", "failed"]
    assert seen[0].status_message and seen[1].progress is not None and seen[1].progress.done == 10
    assert hub.seen == ["POST /api/jobs"] + [f"GET /api/jobs/{JID}"] * 3


def test_submit_without_wait_answers_the_queued_job_and_a_dict_goes_as_it_is() -> None:
    hub = Hub({("POST", "/api/jobs"): job()})
    with hub.client() as c:
        assert c.jobs.submit({"name": "train", "image": "img", "extra": 1}).status == "pending"
    assert json.loads(hub.bodies[0]) == {"name": "train", "image": "img", "extra": 1}


def test_a_name_is_the_callers_newest_job_of_that_name_and_an_id_shaped_name_is_tried_as_a_name() -> None:
    older, newer = job(id=JID, created="2026-12-07T09:00:00Z"), job(id=JID2, created="2026-12-07T10:00:00Z")
    # Another user's job of that name (an admin's list holds everyone's) is not the caller's.
    theirs = {**job(id="9" * 32, created="2026-12-07T11:00:00Z"), "owner": "bob"}
    hub = Hub({("GET", "/api/me"): ME, ("GET", "/api/jobs"): [[theirs, older, newer]],
               ("GET", f"/api/jobs/{JID2}"): newer, ("POST", f"/api/jobs/{JID2}/cancel"): job("cancelled", id=JID2)})
    with hub.client() as c:
        assert c.jobs.get("train").id == JID2
        assert c.jobs.cancel("train").status == "cancelled"
    assert hub.seen[:3] == ["GET /api/me", "GET /api/jobs?name=train&owner=alice&limit=1000", f"GET /api/jobs/{JID2}"]
    hexed = "e" * 32
    named = Hub({("GET", "/api/me"): ME, ("GET", f"/api/jobs/{hexed}"): not_found("JOB_NOT_FOUND"),
                 ("GET", "/api/jobs"): [[job(id=JID2, name=hexed)]], ("GET", f"/api/jobs/{JID2}"): newer})
    with named.client() as c:
        assert c.jobs.get(hexed).id == JID2  # no job has that id: the newest named so
    assert named.seen[-1] == f"GET /api/jobs/{JID2}"
    missing = Hub({("GET", "/api/me"): ME, ("GET", "/api/jobs"): [[]]})
    with missing.client() as c, pytest.raises(ApiError) as caught:
        c.jobs.logs("nope")
    assert (caught.value.status, caught.value.code) == (404, "JOB_NOT_FOUND")


def test_list_logs_and_followed_logs_send_their_filters() -> None:
    hub = Hub({("GET", "/api/jobs"): [[job()]], ("GET", f"/api/jobs/{JID}"): job("running"),
               ("GET", f"/api/jobs/{JID}/logs"): [httpx.Response(200, text="one\ntwo\n")]})
    with hub.client() as c:
        assert [j.id for j in c.jobs.list(status="running", pipeline_id=PID, limit=5)] == [JID]
        assert c.jobs.logs(JID, attempt=2, tail=10) == "one\ntwo\n"
        with c.jobs.follow_logs(JID, attempt=2) as lines:
            assert list(lines) == ["one", "two"]
    assert hub.seen == [f"GET /api/jobs?status=running&pipeline_id={PID}&limit=5&offset=0",
                        f"GET /api/jobs/{JID}/logs?attempt=2&tail=10", f"GET /api/jobs/{JID}",
                        f"GET /api/jobs/{JID}/logs?attempt=2&follow=true"]


def test_a_wait_past_its_timeout_says_the_job_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub({("GET", f"/api/jobs/{JID}"): job("running")})
    with hub.client() as c, pytest.raises(ApiError) as caught:
        c.jobs.wait(JID, timeout=0.0)
    assert caught.value.code == "WAIT_TIMEOUT" and caught.value.details == {"id": JID}


def test_a_wait_rides_out_a_hub_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "RETRY_FIRST", 0.0)
    hub = Hub({("GET", f"/api/jobs/{JID}"): [job("running"), httpx.Response(503, text="restarting"),
                                             job("succeeded")]})
    with hub.client() as c:
        assert c.jobs.wait(JID).status == "succeeded"


def test_upload_streams_the_file_with_its_name_and_byte_progress(tmp_path: Path) -> None:
    path = tmp_path / "reads.tsv"
    path.write_bytes(DATA)
    hub = Hub({("POST", "/api/artifacts"): httpx.Response(201, json=artifact("reads.tsv"))})
    done: list[tuple[int, int]] = []
    with hub.client() as c:
        row = c.artifacts.upload(path, progress=lambda d, t: done.append((d, t)))
    assert row.path == "reads.tsv" and hub.seen == ["POST /api/artifacts?name=reads.tsv"] and hub.bodies[0] == DATA
    assert done[0] == (0, len(DATA)) and done[-1] == (len(DATA), len(DATA))


def test_a_download_lands_whole_and_checked_or_not_at_all(tmp_path: Path) -> None:
    hub = Hub({("GET", f"/api/artifacts/{AID}"): artifact(), ("GET", f"/api/artifacts/{AID}/content"): [
        httpx.Response(200, content=DATA), httpx.Response(200, content=DATA[:-1] + b"X")]})
    with hub.client() as c:
        saved = c.artifacts.download(AID, tmp_path)
        assert saved == tmp_path / "out" / "result.txt" and saved.read_bytes() == DATA
        target = tmp_path / "elsewhere.txt"
        with pytest.raises(ApiError) as caught:
            c.artifacts.download(AID, target)
    assert caught.value.code == "DIGEST_MISMATCH"
    # Neither the file nor its temporary copy is left behind.
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_jobs_outputs_download_under_their_paths_and_never_outside_the_folder(tmp_path: Path) -> None:
    other = b"second"
    rows = [artifact(), artifact("top.json", other, id="f" * 32)]
    hub = Hub({("GET", f"/api/jobs/{JID}/artifacts"): [rows],
               ("GET", f"/api/artifacts/{AID}/content"): httpx.Response(200, content=DATA),
               ("GET", f"/api/artifacts/{'f' * 32}/content"): httpx.Response(200, content=other)})
    with hub.client() as c:
        assert c.jobs.download(JID, tmp_path / "all") == [tmp_path / "all/out/result.txt", tmp_path / "all/top.json"]
        assert c.jobs.download(JID, tmp_path / "one", path="out") == [tmp_path / "one/out/result.txt"]
        with pytest.raises(ApiError) as caught:
            c.jobs.download(JID, tmp_path, path="nothing")
        assert caught.value.code == "ARTIFACT_NOT_FOUND"
    assert (tmp_path / "all/top.json").read_bytes() == other
    evil = Hub({("GET", f"/api/jobs/{JID}/artifacts"): [[artifact("../../escape")]]})
    with evil.client() as c, pytest.raises(ApiError) as caught:
        c.jobs.download(JID, tmp_path / "x")
    assert caught.value.code == "BAD_ANSWER" and not (tmp_path.parent / "escape").exists()


def test_pipelines_submit_cancel_retry_and_wait() -> None:
    steps = [job("succeeded", step="convert"), job("failed", id=JID2, step="features")]
    hub = Hub({("POST", "/api/pipelines"): httpx.Response(201, json=pipeline("pending")),
               ("GET", f"/api/pipelines/{PID}"): [pipeline("running"), pipeline("failed", steps)],
               ("POST", f"/api/pipelines/{PID}/retry"): pipeline("running"),
               ("POST", f"/api/pipelines/{PID}/cancel"): pipeline("cancelled"),
               ("GET", "/api/pipelines"): [[pipeline()]]})
    with hub.client() as c:
        ended = c.pipelines.submit({"name": "feat", "steps": []}, wait=True)
        assert ended.status == "failed" and [s.step for s in ended.steps] == ["convert", "features"]
        assert c.pipelines.retry(PID).status == "running"
        assert c.pipelines.cancel(PID).status == "cancelled"
        assert [p.id for p in c.pipelines.list(status="running")] == [PID]
    assert hub.seen[-1] == "GET /api/pipelines?status=running&limit=100&offset=0"


def test_the_async_client_has_the_same_calls(tmp_path: Path) -> None:
    hub = Hub({("POST", "/api/jobs"): job(), ("GET", f"/api/jobs/{JID}"): [job("running"), job("succeeded")],
               ("GET", f"/api/artifacts/{AID}"): artifact(),
               ("GET", f"/api/artifacts/{AID}/content"): httpx.Response(200, content=DATA)})

    async def main() -> tuple[str, Path, list[int]]:
        seen: list[int] = []

        async def told(done: int, total: int) -> None:
            seen.append(done)

        async with AsyncClient(url="http://hub", token="t", transport=httpx.MockTransport(hub)) as c:
            ended = await c.jobs.submit({"name": "train", "image": "img"}, wait=True)
            return ended.status, await c.artifacts.download(AID, tmp_path / "r.txt", progress=told), seen

    status, saved, seen = asyncio.run(main())
    assert status == "succeeded" and saved.read_bytes() == DATA and seen[0] == 0 and seen[-1] == len(DATA)


class Quiet(httpx.SyncByteStream):
    """A followed log that sends its lines, then nothing (a read timeout), or ends."""

    def __init__(self, lines: bytes, quiet: bool) -> None:
        self.lines, self.quiet = lines, quiet

    def __iter__(self) -> Iterator[bytes]:
        yield self.lines
        if self.quiet:
            raise httpx.ReadTimeout("no data")


def test_a_quiet_followed_log_is_opened_again_with_only_the_lines_still_to_come() -> None:
    hub = Hub({("GET", f"/api/jobs/{JID}"): job("running"), ("GET", f"/api/jobs/{JID}/logs"): [
        httpx.Response(200, stream=Quiet(b"one\n", quiet=True)), httpx.Response(200, stream=Quiet(b"two\n", False))]})
    with hub.client() as c, c.jobs.follow_logs(JID, tail=5) as lines:
        # Each line once: the stream opened again takes none of those before it.
        assert list(lines) == ["one", "two"]
    assert hub.seen[1:] == [f"GET /api/jobs/{JID}/logs?tail=5&follow=true", f"GET /api/jobs/{JID}/logs?tail=0&follow=true"]
