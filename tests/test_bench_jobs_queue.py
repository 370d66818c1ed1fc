"""The short-jobs queue benchmark's small version (issue 27): 6 jobs on two real controllers of two containers
each, and the same containers straight through Docker. Timing is not asserted; what is deterministic is: every
job succeeded with exactly one attempt, on both controllers, each with its dispatch and start recorded, and every
baseline container ran."""

import pytest

from bench.jobs_queue import measure, table

pytestmark = pytest.mark.slow


def test_jobs_queue_small(pg_server: str) -> None:
    result = measure(jobs=6, max_containers=2, connections=4, server=pg_server)
    hub, base = result["hub"], result["docker"]
    assert hub["all_succeeded"] and hub["exactly_one_attempt"], hub
    assert sum(hub["attempts_per_controller"].values()) == 6 and len(hub["attempts_per_controller"]) == 2
    assert hub["attempts_without_started_at"] == 0
    for key in ("submit_to_dispatch", "submit_to_start", "submit_to_succeeded"):
        assert hub[key]["n"] == 6 and 0 <= hub[key]["p50_s"] <= hub[key]["p99_s"]
    assert hub["submit_to_dispatch"]["p50_s"] <= hub["submit_to_start"]["p50_s"] <= hub["submit_to_succeeded"]["p50_s"]
    assert base["errors"] == 0 and base["workers"] == 4 and base["queued_to_start"]["n"] == 6
    assert hub["per_second"] > 0 and base["per_second"] > 0
    assert table(result).count("\n") == 3
