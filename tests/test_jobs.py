"""Batch jobs end to end on a real lab (a hub, two controllers, the Docker engine, PostgreSQL), as a user runs
them: an uploaded input read under /inputs and outputs written under /outputs, downloaded and checked by
sha256; a job that feeds another; a failing job retried then failed; a timeout; a cancel; a job queued behind
a full fleet that starts once room frees; a job whose controller is lost, run again elsewhere, its stale copy
fenced; and a job no controller could ever run, refused at once."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.support.lab import Lab, running_lab
from tests.support.pg import create_database
from tests.support.poll import wait_until

# A job that runs until it is stopped, and stops at once when told (a shell as PID 1 ignores SIGTERM).
FOREVER = "trap 'exit 143' TERM; while true; do sleep 0.05; done"


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "jobs")


@pytest.fixture
def lab(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[Lab]:
    # One container at a time on each controller: the fleet is full with two jobs running.
    with running_lab(db_url, tmp_path, request, docker_client,
                     hub_env={"MMANAGER_ARTIFACT_STORE": str(tmp_path / "artifacts"),
                              "MMANAGER_JOB_WATCH_WAIT": "2"},
                     controller_env={"MAX_CONTAINERS": "1"}) as lab:
        yield lab


def submit(hub: httpx.Client, image: str, name: str, script: str, **fields: Any) -> dict[str, Any]:
    r = hub.post("/api/jobs", json={"name": name, "image": image, "command": ["sh", "-c", script], **fields})
    assert r.status_code == 201, r.text
    return r.json()


def job_in(hub: httpx.Client, job_id: str, *statuses: str, timeout: float = 30.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = hub.get(f"/api/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(check, timeout, f"job {job_id} {'/'.join(statuses)}")


def test_jobs_run_queue_retry_time_out_cancel_and_feed_each_other(lab: Lab, example_image: str,
                                                                  docker_client: docker.DockerClient) -> None:
    with lab.hub() as hub:
        # An input, uploaded.
        data = b"acgt\nttga\n"
        r = hub.post("/api/artifacts", params={"name": "seq.txt"}, content=data,
                     headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        upload = r.json()
        assert upload["sha256"] == "sha256:" + hashlib.sha256(data).hexdigest()

        # A job that needs a kind of server the fleet lacks is refused at once, with each controller's reason.
        r = hub.post("/api/jobs", json={"name": "gpu", "image": example_image, "resources": {"gpu_count": 1}})
        assert r.status_code == 409 and r.json()["error"]["code"] == "NEVER_FITS", r.text
        assert {x["code"] for x in r.json()["error"]["details"]["rejections"]} == {"SERVER_TYPE"}

        # A job reading its input and writing outputs, and one fed by its output (it waits for it).
        # Outputs may have any name a file may ('?', '#', '%' in a URL's path are quoted on the way).
        odd = ["what?.txt", "x#y", "a%41.txt", "é ü.txt"]
        first = submit(hub, example_image, "upper", "echo reading; mkdir -p /outputs/out && "
                       "tr a-z A-Z < /inputs/seq.txt > /outputs/out/upper.txt && "
                       "for n in " + " ".join(f"'{n}'" for n in odd) + "; do echo \"$n\" > \"/outputs/$n\"; done",
                       inputs=[upload["id"]])
        second = submit(hub, example_image, "count", "wc -l < /inputs/upper.txt > /outputs/lines.txt",
                        inputs=[{"job": first["id"], "path": "out/upper.txt", "as": "upper.txt"}])
        assert second["needs"] == [first["id"]]
        done = job_in(hub, first["id"], "succeeded", "failed", "cancelled")
        assert done["status"] == "succeeded", done
        outs = {a["path"]: a for a in hub.get(f"/api/jobs/{first['id']}/artifacts").json()}
        assert sorted(outs) == sorted(["out/upper.txt", *odd])
        for n in odd:
            assert hub.get(outs[n]["url"]).text == n + "\n"
        out = outs["out/upper.txt"]
        body = hub.get(out["url"]).content
        assert body == data.upper() and out["sha256"] == "sha256:" + hashlib.sha256(body).hexdigest()
        assert "reading" in hub.get(f"/api/jobs/{first['id']}/logs").text
        fed = job_in(hub, second["id"], "succeeded", "failed", "cancelled")
        assert fed["status"] == "succeeded", fed
        [lines] = hub.get(f"/api/jobs/{second['id']}/artifacts").json()
        assert hub.get(lines["url"]).text.strip() == "2"

        # A failing job is retried once, then fails with its exit code.
        failing = submit(hub, example_image, "failing", "echo trying; exit 3", retries=1)
        # A job past its timeout is stopped.
        slow = submit(hub, example_image, "slow", FOREVER, timeout=1)
        failed = job_in(hub, failing["id"], "failed", "succeeded")
        assert (failed["exit_code"], [a["status"] for a in failed["attempts"]]) == (3, ["failed", "failed"])
        timed_out = job_in(hub, slow["id"], "timed_out", "failed", "succeeded")
        assert timed_out["status"] == "timed_out", timed_out

        # Two jobs fill the fleet; a third waits, saying why, and starts once one of them is cancelled.
        blockers = [submit(hub, example_image, f"blocker{i}", FOREVER) for i in range(2)]
        for b in blockers:
            job_in(hub, b["id"], "running")
        queued = submit(hub, example_image, "queued", "echo ran")
        waiting = wait_until(lambda: (j := hub.get(f"/api/jobs/{queued['id']}").json())["wait_reasons"] and j,
                             10, "the queued job's reasons")
        assert waiting["status"] == "pending"
        assert {x["code"] for x in waiting["wait_reasons"]} == {"MAX_CONTAINERS"}, waiting
        r = hub.post(f"/api/jobs/{blockers[0]['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        assert job_in(hub, queued["id"], "succeeded", "failed")["status"] == "succeeded"
        assert hub.post(f"/api/jobs/{blockers[1]['id']}/cancel").json()["status"] == "cancelled"
        assert hub.post(f"/api/jobs/{blockers[1]['id']}/cancel").json()["error"]["code"] == "JOB_FINISHED"
        # The cancelled attempt's end is collected.
        wait_until(lambda: hub.get(f"/api/jobs/{blockers[0]['id']}").json()["attempts"][0]["status"] == "cancelled",
                   15, "the cancelled attempt settled")

        # A controller frozen under a running job is declared lost: the job runs again on the other, and the
        # frozen one's copy is stopped when it comes back (the heartbeat's fence), before it takes new work.
        survivor = submit(hub, example_image, "survivor",
                          f'if [ "$MMANAGER_ATTEMPT" = 1 ]; then {FOREVER}; fi; echo "$MMANAGER_ATTEMPT" > /outputs/n.txt')
        victim = job_in(hub, survivor["id"], "running")["attempts"][0]["controller_id"]
        wait_until(lambda: docker_client.containers.list(filters={"label": f"mmanager.job={survivor['id']}"}), 15,
                   "the first attempt's container")
        proc = lab.dep.controllers[victim]
        proc.signal(signal.SIGSTOP)
        try:
            moved = job_in(hub, survivor["id"], "succeeded", "failed")
        finally:
            proc.signal(signal.SIGCONT)
        assert [(a["status"], a["controller_id"] == victim) for a in moved["attempts"]] == [("lost", True),
                                                                                           ("succeeded", False)]
        [n] = hub.get(f"/api/jobs/{survivor['id']}/artifacts").json()
        assert hub.get(n["url"]).text.strip() == "2"
        wait_until(lambda: not docker_client.containers.list(filters={"label": f"mmanager.job={survivor['id']}"}),
                   15, "the lost attempt's copy fenced")

        # Each change is in the owner's operation history.
        ops = [o["operation"] for o in hub.get("/api/operations", params={"limit": 1000}).json()
               if o.get("job_id") == failing["id"]]
        assert sorted(ops) == sorted(["job_submit", "job_start", "job_retry", "job_start", "job_failed"])
