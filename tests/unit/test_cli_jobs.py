"""``mmanager jobs``, ``artifacts`` and ``pipelines`` in-process, on a fake SDK client (unit tests only;
tests/test_cli.py runs them against a real hub): the calls each makes, what it prints, how it fails."""

from __future__ import annotations

import builtins
import io
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hub.job_schemas import ArtifactOut, JobOut, PipelineOut
from hub.schemas import MeOut
from mmanager.client import ApiError
from mmanager.commands import render
from mmanager.wire import JobProgress
from tests.support.cli_fake import FakeClientBase, run, use_client

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
JID, AID, PID = "a" * 32, "c" * 32, "d" * 32


def job_out(status: str = "pending", name: str = "train", **extra: Any) -> JobOut:
    return JobOut.model_validate({
        "id": JID, "name": name, "owner": "alice", "spec": {"name": name, "image": "img:1", "command": ["run"]},
        "status": status, "priority": 0, "retries": 0, "created_at": NOW, **extra})


def attempt(number: int, status: str, **extra: Any) -> dict[str, Any]:
    return {"number": number, "controller_id": "a", "status": status, "created_at": NOW, **extra}


def artifact_out(path: str = "out/result.txt", id: str = AID, job: str | None = JID) -> ArtifactOut:
    return ArtifactOut(id=id, path=path, size=2_000, sha256="sha256:" + "e" * 64, owner="alice", job_id=job,
                       attempt=1 if job else None, url=f"/api/artifacts/{id}/content", created_at=NOW)


class FakeJobs:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls
        # What each wait's polls find, in turn; the last one is the end.
        self.polls: list[JobOut] = [job_out("succeeded")]
        self.logs_text = "line one\nline two\n"

    def submit(self, spec: dict[str, Any], wait: bool = False, progress: Any = None,
               timeout: float | None = None) -> JobOut:
        self.calls.append(("submit", spec))
        if spec.get("image") == "refused":
            raise ApiError(409, "NEVER_FITS", "no controller could ever run it: a: 8 GPUs asked, it has 1")
        return job_out("pending", name=spec.get("name", "train"))

    def wait(self, ref: str, progress: Any = None, timeout: float | None = None) -> JobOut:
        self.calls.append(("wait", ref))
        for seen in self.polls:
            if progress is not None:
                progress(seen)
        return self.polls[-1]

    def list(self, **filters: Any) -> list[JobOut]:
        self.calls.append(("list", filters))
        return [job_out("running", progress={"done": 12_000, "total": 52_000, "unit": "records", "rate": 8_100})]

    def get(self, ref: str) -> JobOut:
        self.calls.append(("get", ref))
        if ref == "missing":
            raise ApiError(404, "JOB_NOT_FOUND", "alice has no job named 'missing'")
        return self.polls[0]

    def cancel(self, ref: str) -> JobOut:
        self.calls.append(("cancel", ref))
        if ref == "done":
            raise ApiError(409, "JOB_FINISHED", "job train has already ended (succeeded)")
        return job_out("cancelled")

    def logs(self, ref: str, attempt: int | None = None, tail: int | None = None) -> str:
        self.calls.append(("logs", ref, attempt, tail))
        return self.logs_text

    def follow_logs(self, ref: str, attempt: int | None = None, tail: int | None = None) -> Any:
        self.calls.append(("follow_logs", ref, attempt, tail))
        calls = self.calls

        class Lines:
            def __enter__(self) -> Any:
                return iter([f"attempt {attempt} says hi", "\x1b[31mraw\x1b[0m"])

            def __exit__(self, *exc: object) -> None:
                calls.append(("closed", attempt))

        return Lines()

    def artifacts(self, ref: str, attempt: int | None = None) -> builtins.list[ArtifactOut]:
        self.calls.append(("artifacts", ref, attempt))
        return [artifact_out()]

    def download(self, ref: str, dest: Any, path: str | None = None, attempt: int | None = None,
                 progress: Any = None) -> builtins.list[Path]:
        self.calls.append(("download", ref, Path(dest), path, attempt, progress))
        return [Path(dest) / "out/result.txt"]


class FakeArtifacts:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def upload(self, path: Any, name: str | None = None, progress: Any = None) -> ArtifactOut:
        self.calls.append(("upload", Path(path).read_bytes(), name, progress))
        return artifact_out(name or Path(path).name, id="f" * 32, job=None)

    def list(self, job_id: str | None = None, limit: int = 100, offset: int = 0) -> list[ArtifactOut]:
        self.calls.append(("artifacts.list", job_id))
        return [artifact_out("w\x1b[31m.txt")]

    def get(self, artifact_id: str) -> ArtifactOut:
        return artifact_out()

    def download(self, artifact_id: str, dest: Any, progress: Any = None) -> Path:
        self.calls.append(("artifacts.download", artifact_id, Path(dest)))
        if artifact_id != AID:
            raise ApiError(0, "DIGEST_MISMATCH", "out.txt: the bytes received hash to sha256:00, not sha256:ee")
        return Path(dest) / "result.txt"

    def delete(self, artifact_id: str) -> None:
        self.calls.append(("artifacts.delete", artifact_id))
        if artifact_id != AID:
            raise ApiError(409, "ARTIFACT_IN_USE", "job train (pending) names it")


def pipeline_out(status: str = "running", steps: list[JobOut] | None = None) -> PipelineOut:
    return PipelineOut(id=PID, name="feat", owner="alice", spec={"steps": [{"name": "convert"}, {"name": "features"}]},
                       status=status, steps=steps or [], created_at=NOW, updated_at=NOW)  # type: ignore[arg-type]


class FakePipelines:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls
        self.end = pipeline_out("succeeded", [job_out("succeeded", step="convert"),
                                              job_out("succeeded", step="features")])

    def submit(self, spec: dict[str, Any], wait: bool = False, progress: Any = None) -> PipelineOut:
        self.calls.append(("pipelines.submit", spec))
        if any(s.get("needs") == [s["name"]] for s in spec.get("steps", [])):
            raise ApiError(422, "PIPELINE_CYCLE", "steps a -> a form a cycle")
        return pipeline_out("pending")

    def wait(self, ref: str, progress: Any = None, timeout: float | None = None) -> PipelineOut:
        self.calls.append(("pipelines.wait", ref))
        if progress is not None:
            progress(self.end)
        return self.end

    def list(self, **filters: Any) -> list[PipelineOut]:
        self.calls.append(("pipelines.list", filters))
        return [pipeline_out()]

    def get(self, ref: str) -> PipelineOut:
        self.calls.append(("pipelines.get", ref))
        return pipeline_out("running", [
            job_out("succeeded", step="convert"),
            job_out("running", step="features", progress={"done": 12_000, "total": 52_000, "unit": "records",
                                                           "rate": 8_100})])

    def cancel(self, ref: str) -> PipelineOut:
        self.calls.append(("pipelines.cancel", ref))
        return pipeline_out("cancelled")

    def retry(self, ref: str) -> PipelineOut:
        self.calls.append(("pipelines.retry", ref))
        return pipeline_out("running")


class FakeClient(FakeClientBase):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.jobs = FakeJobs(self.calls)
        self.artifacts = FakeArtifacts(self.calls)
        self.pipelines = FakePipelines(self.calls)

    def me(self) -> MeOut:
        return MeOut(username="alice", admin=False)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    return use_client(monkeypatch, FakeClient())


def test_progress_reads_as_records_done_of_total_and_a_rate() -> None:
    assert render.job_progress(JobProgress(done=12_000, total=52_000, unit="records", rate=8_100)) \
        == "12,000/52,000 records (8,100 rec/s)"
    assert render.job_progress(JobProgress(done=3, unit="files"), rate=1.5) == "3 files (1.5 files/s)"
    assert render.job_progress(None) == "-"


def test_submit_from_a_file_prints_the_queued_job(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: train\nimage: img:1\ncommand: [python, t.py]\nenv: {SEED: 7}\n")
    done = run("jobs", "submit", "-f", str(spec))
    assert done.exit_code == 0, done.output
    assert done.stdout == f"train: pending, job {JID}\n"
    assert fake.calls == [("submit", {"name": "train", "image": "img:1", "command": ["python", "t.py"],
                                      "env": {"SEED": 7}})]
    assert json.loads(run("jobs", "submit", "-f", str(spec), "--json").stdout)["id"] == JID


def test_a_spec_that_cannot_be_read_is_a_usage_error_and_the_hubs_refusal_one_line(fake: FakeClient,
                                                                                   tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    done = run("jobs", "submit", "-f", str(bad))
    assert done.exit_code == 2 and done.stderr.startswith(f"error: INVALID_FILE: {bad}: not YAML")
    assert run("jobs", "submit", "-f", str(tmp_path / "none.json")).exit_code == 2
    (tmp_path / "list.yaml").write_text("- name: a\n")
    assert run("jobs", "submit", "-f", str(tmp_path / "list.yaml")).exit_code == 1
    (tmp_path / "never.yaml").write_text("name: big\nimage: refused\n")
    refused = run("jobs", "submit", "-f", str(tmp_path / "never.yaml"))
    assert (refused.exit_code, refused.stderr) == (
        1, "error: NEVER_FITS: no controller could ever run it: a: 8 GPUs asked, it has 1\n")
    assert [c[0] for c in fake.calls] == ["submit"]


def test_run_uploads_local_inputs_then_submits_and_waits(fake: FakeClient, tmp_path: Path) -> None:
    data = tmp_path / "reads.tsv"
    data.write_bytes(b"id\tseq\n")
    fake.jobs.polls = [job_out("pending", status_message="no room"),
                       job_out("succeeded", started_at=NOW, finished_at=NOW + timedelta(seconds=12),
                               progress={"done": 52_000, "total": 52_000, "unit": "records"})]
    done = run("jobs", "run", "--image", "reg/lab/feat:2", "--input", str(data), "--input", AID, "--env", "A=b=c",
               "--gpus", "1", "--memory", "2g", "--cpu", "1", "--retries", "2", "--timeout", "60", "--priority", "5",
               "--wait", "--", "python", "-m", "feat", "--limit", "10")
    assert done.exit_code == 0, done.output
    assert fake.calls[0] == ("upload", b"id\tseq\n", None, None)
    assert fake.calls[1] == ("submit", {
        "name": "feat", "image": "reg/lab/feat:2", "command": ["python", "-m", "feat", "--limit", "10"],
        "env": {"A": "b=c"}, "inputs": ["f" * 32, AID], "retries": 2, "priority": 5, "timeout": 60.0,
        "resources": {"gpu_required": True, "gpu_count": 1, "memory_limit": "2g", "cpu_limit": 1.0}})
    assert fake.calls[2] == ("wait", JID)
    assert done.stdout == f"train: succeeded after 12.0s, 52,000/52,000 records (job {JID})\n"
    assert "uploaded as artifact " + "f" * 32 in done.stderr and "/inputs/reads.tsv" in done.stderr


def test_run_refuses_what_is_neither_a_file_nor_an_artifact_and_a_bad_env(fake: FakeClient) -> None:
    missing = run("jobs", "run", "--image", "img", "--input", "nope.tsv", "--", "true")
    assert missing.exit_code == 2 and "nope.tsv: no such file, nor an artifact id" in missing.stderr
    assert run("jobs", "run", "--image", "img", "--env", "NOEQUALS").exit_code == 2
    assert fake.calls == []


def test_a_waited_job_that_failed_exits_1_with_its_reason(fake: FakeClient) -> None:
    fake.jobs.polls = [job_out("failed", exit_code=3, status_message="attempt 3 of 3 failed")]
    done = run("jobs", "run", "--image", "img", "--wait", "--json", "--", "false")
    assert done.exit_code == 1
    assert json.loads(done.stdout)["status"] == "failed"
    assert done.stderr == f"error: JOB_FAILED: job train ({JID}) failed: attempt 3 of 3 failed\n"


def test_follow_prints_each_attempts_log_then_the_end_on_stderr(fake: FakeClient) -> None:
    first = job_out("running", attempts=[attempt(1, "running")])
    second = job_out("running", attempts=[attempt(1, "failed"), attempt(2, "running")])
    fake.jobs.polls = [first, second, job_out("succeeded", attempts=[attempt(1, "failed"), attempt(2, "succeeded")])]
    waits = iter([[first], [second], fake.jobs.polls[2:]])
    real_wait = fake.jobs.wait

    def wait(ref: str, progress: Any = None, timeout: float | None = None) -> JobOut:
        fake.jobs.polls = next(waits)
        return real_wait(ref, progress, timeout)

    fake.jobs.wait = wait  # type: ignore[method-assign]
    done = run("jobs", "run", "--image", "img", "--follow", "--", "echo", "hi")
    assert done.exit_code == 0, done.output
    # The log is printed raw (as services logs), each attempt once; the rest goes to stderr.
    assert done.stdout == "attempt 1 says hi\n\x1b[31mraw\x1b[0m\nattempt 2 says hi\n\x1b[31mraw\x1b[0m\n"
    assert done.stderr.startswith("-- attempt 2 on a --\ntrain: succeeded")
    assert [c for c in fake.calls if c[0] in ("follow_logs", "closed")] == [
        ("follow_logs", JID, 1, None), ("closed", 1), ("follow_logs", JID, 2, None), ("closed", 2)]


def test_list_show_and_why_a_job_waits(fake: FakeClient) -> None:
    listed = run("jobs", "list", "--status", "running")
    assert listed.exit_code == 0 and "12,000/52,000 records (8,100 rec/s)" in listed.stdout
    assert fake.calls[-1] == ("list", {"status": "running", "name": None, "owner": "alice", "pipeline_id": None,
                                       "limit": 100, "offset": 0})
    run("jobs", "list", "--all")
    assert fake.calls[-1][1]["owner"] is None
    fake.jobs.polls = [job_out("pending", status_message="no controller has room: 2 of 2 refused",
                               wait_reasons=[{"controller_id": "a", "reason": "needs 1 GPU, 0 free"},
                                             {"controller_id": "b", "reason": "no\x1b[2J GPU"}],
                               attempts=[attempt(1, "lost", error="controller a was lost")])]
    shown = run("jobs", "show", "train").stdout
    assert "pending (no controller has room: 2 of 2 refused)" in shown
    assert "needs 1 GPU, 0 free" in shown and "\x1b" not in shown and "controller a was lost" in shown
    assert json.loads(run("jobs", "show", "train", "--json").stdout)["wait_reasons"][0]["controller_id"] == "a"
    missing = run("jobs", "show", "missing")
    assert (missing.exit_code, missing.stderr) == (1, "error: JOB_NOT_FOUND: alice has no job named 'missing'\n")


def test_logs_cancel_artifacts_and_download(fake: FakeClient, tmp_path: Path) -> None:
    assert run("jobs", "logs", "train", "--attempt", "2", "--tail", "5").stdout == "line one\nline two\n"
    assert fake.calls[-1] == ("logs", "train", 2, 5)
    assert json.loads(run("jobs", "logs", "train", "--json").stdout) == {"logs": "line one\nline two\n"}
    assert run("jobs", "cancel", "train").stdout == f"train: cancelled (job {JID})\n"
    finished = run("jobs", "cancel", "done")
    assert (finished.exit_code, finished.stderr) == (1, "error: JOB_FINISHED: job train has already ended "
                                                        "(succeeded)\n")
    listed = run("jobs", "artifacts", "train")
    assert "out/result.txt" in listed.stdout and "2.0 kB" in listed.stdout and AID in listed.stdout
    got = run("jobs", "download", "train", "--out", str(tmp_path), "--path", "out")
    assert got.stdout == f"{tmp_path}/out/result.txt\n"
    assert fake.calls[-1] == ("download", "train", tmp_path, "out", None, None)
    assert json.loads(run("jobs", "download", "train", "--json").stdout) == ["out/result.txt"]


def test_artifacts_upload_list_download_delete(fake: FakeClient, tmp_path: Path) -> None:
    path = tmp_path / "reads.tsv"
    path.write_bytes(b"abc")
    done = run("artifacts", "upload", str(path))
    assert done.stdout == "f" * 32 + "\n" and "inputs: [" + "f" * 32 + "]" in done.stderr
    assert json.loads(run("artifacts", "upload", str(path), "--name", "x.tsv", "--json").stdout)["path"] == "x.tsv"
    listed = run("artifacts", "list", "--job", JID).stdout
    assert "w[31m.txt" in listed and "\x1b" not in listed and ("artifacts.list", JID) in fake.calls
    assert run("artifacts", "download", AID, "-o", str(tmp_path)).stdout == f"{tmp_path}/result.txt\n"
    bad = run("artifacts", "download", "b" * 32)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: DIGEST_MISMATCH: ")
    assert run("artifacts", "delete", AID).stdout == f"{AID}: deleted\n"
    used = run("artifacts", "delete", "b" * 32)
    assert (used.exit_code, used.stderr) == (1, "error: ARTIFACT_IN_USE: job train (pending) names it\n")
    assert run("artifacts", "upload", str(tmp_path / "missing")).exit_code == 2


def test_pipelines_submit_show_watch_cancel_retry(fake: FakeClient, tmp_path: Path) -> None:
    spec = tmp_path / "p.yaml"
    spec.write_text("name: feat\nsteps:\n- {name: convert, image: img}\n- {name: features, image: img, "
                    "needs: [convert]}\n")
    assert run("pipelines", "submit", "-f", str(spec)).stdout == \
        f"feat: submitted; pending, steps 0/2 succeeded (pipeline {PID})\n"
    waited = run("pipelines", "submit", "-f", str(spec), "--wait")
    assert waited.exit_code == 0 and "succeeded" in waited.stdout and ("pipelines.wait", PID) in fake.calls
    shown = run("pipelines", "show", "feat").stdout
    assert "convert" in shown and "features" in shown and "12,000/52,000 records (8,100 rec/s)" in shown
    assert "1/2" in shown
    fake.pipelines.end = pipeline_out("failed", [job_out("succeeded", step="convert"),
                                                 job_out("failed", step="features", exit_code=2)])
    watched = run("pipelines", "watch", "feat")
    assert watched.exit_code == 1
    assert watched.stderr == f"error: PIPELINE_FAILED: pipeline feat ({PID}) failed: step features failed " \
                             "(exit code 2)\n"
    assert run("pipelines", "retry", "feat").stdout.startswith("feat: retried; running")
    assert json.loads(run("pipelines", "cancel", "feat", "--json").stdout)["status"] == "cancelled"
    assert "feat" in run("pipelines", "list").stdout
    spec.write_text("name: loop\nsteps:\n- {name: a, image: img, needs: [a]}\n")
    cycle = run("pipelines", "submit", "-f", str(spec))
    assert (cycle.exit_code, cycle.stderr) == (1, "error: PIPELINE_CYCLE: steps a -> a form a cycle\n")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_wait_draws_a_live_progress_line_and_a_watch_a_line_per_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mmanager.commands import jobs, pipelines

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    with jobs.job_line(False, "train") as update:
        update(job_out("pending", status_message="no controller has 1 free GPU"))
        update(job_out("running", progress={"done": 12_000, "total": 52_000, "unit": "records", "rate": 8_100}))
    with pipelines.live_steps(False) as update:
        update(FakePipelines([]).get("feat"))
    drawn = screen.getvalue()
    assert "train pending (no controller has 1 free GPU)" in drawn
    assert "12,000/52,000 records (8,100 rec/s)" in drawn and "━" in drawn
    assert "features" in drawn and "steps 1/2 succeeded" in drawn


def test_ctrl_c_while_waiting_leaves_the_job_running_and_says_so(fake: FakeClient,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(ref: str, progress: Any = None, timeout: float | None = None) -> JobOut:
        raise KeyboardInterrupt

    monkeypatch.setattr(fake.jobs, "wait", interrupted)
    done = run("jobs", "run", "--image", "img", "--wait")
    assert done.exit_code == 130
    assert done.stderr == f"interrupted; job {JID} goes on on the hub (mmanager jobs cancel {JID} stops it)\n"
