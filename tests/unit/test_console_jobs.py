"""The console's jobs pages' templates on their own (no hub): what a job's page and the list show of a job,
its progress as the CLI reads it, why it waits, its attempts and its log, every hub value as text. The
pages on a real hub: tests/hub/test_console_pages.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hub.job_schemas import ArtifactOut, JobOut
from hub.schemas import MeOut
from hub.ui.templating import environment

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)


def job(status: str, **extra: Any) -> JobOut:
    return JobOut.model_validate({"id": "a" * 32, "name": "feat<b>", "owner": "alice", "priority": 0, "retries": 1,
                                  "spec": {"image": "img:1", "command": ["python", "-m", "feat"]}, "status": status,
                                  "created_at": NOW, **extra})


def page(template: str, **context: Any) -> str:
    return environment.get_template(template).render(base="/ui", me=MeOut(username="alice", admin=False), csrf="c",
                                                     error=None, done="", **context)


def test_a_waiting_job_shows_why_and_can_be_cancelled() -> None:
    waiting = job("pending", status_message="no controller has room <script>",
                  wait_reasons=[{"controller_id": "a", "reason": "needs 1 GPU, 0 free"}],
                  attempts=[{"number": 1, "controller_id": "b", "status": "lost", "error": "controller b was lost",
                             "created_at": NOW}])
    shown = page("job.html", job=waiting, logs="line <one>\n", logs_error=None, artifacts=[], artifacts_error=None,
                 final=False, command="python -m feat")
    assert "no controller has room &lt;script&gt;" in shown and "<script>" not in shown.split("</head>")[1]
    assert "needs 1 GPU, 0 free" in shown and "controller b was lost" in shown
    assert 'action="/ui/jobs/' + "a" * 32 + '/cancel"' in shown and "line &lt;one&gt;" in shown


def test_an_ended_job_shows_its_progress_and_outputs_and_the_list_its_progress() -> None:
    done = job("succeeded", progress={"done": 52_000, "total": 52_000, "unit": "records", "rate": 8_100},
               exit_code=0, attempts=[{"number": 1, "controller_id": "a", "status": "succeeded", "created_at": NOW}])
    out = ArtifactOut(id="c" * 32, path="out/features.jsonl", size=10, sha256="sha256:" + "e" * 64, owner="alice",
                      job_id="a" * 32, attempt=1, url="/x", created_at=NOW)
    shown = page("job.html", job=done, logs="", logs_error=None, artifacts=[out], artifacts_error=None, final=True,
                 command="")
    assert "52,000/52,000 records (8,100 rec/s)" in shown and "out/features.jsonl" in shown
    assert "/cancel" not in shown and "feat&lt;b&gt;" in shown
    listed = page("jobs.html", jobs=[done], filters={"status": "", "name": ""},
                  pages={"previous": None, "next": None})
    assert "52,000/52,000 records (8,100 rec/s)" in listed and 'href="/ui/jobs/' + "a" * 32 + '"' in listed
