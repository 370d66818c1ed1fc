"""The killed-controller jobs benchmark's small version (issue 27): a few jobs on two controllers with Docker
engines of their own, the server of one killed mid-run (its controller and its containers). Timing is not
asserted; what is deterministic is: no job lost (each succeeded with the times its container wrote), at most one
attempt of each succeeded, its attempts do not overlap in the hub's records nor in what the engines ran, the
killed server's attempts are ``lost`` and none of their outputs is accepted."""

import pytest

from bench.jobs_failover import measure, table

pytestmark = pytest.mark.slow


# Eight jobs on four slots: after the first wave, the other controller's two slots cannot take the four left, so
# the victim runs some of the second wave whatever order the first ends in (with six, both could go elsewhere).
JOBS = 8


def test_jobs_failover_small(pg_server: str) -> None:
    result = measure(jobs=JOBS, seconds=2, max_containers=2, modes=("server",), server=pg_server)
    [m] = result["modes"]
    assert m["no_job_lost"] and m["succeeded"] == m["with_times_txt"] == JOBS, m
    assert m["running_on_victim_at_kill"] >= 1 and m["attempts_lost"] >= 1 and m["jobs_moved"] >= 1, m
    assert m["two_attempts_succeeded"] == m["hub_record_overlaps"] == m["copies_that_ran_at_once"] == 0, m
    # A lost copy may have ended before the kill (not yet collected); none ended after its job's winner began.
    assert m["written_overlaps"] == m["stale_outputs_accepted"] == 0, m
    # An attempt lost before its container was made ran nowhere.
    assert JOBS <= m["copies_seen_by_the_engines"] <= m["attempts"], m
    assert 0 < m["kill_to_lost_s"] < m["kill_to_last_succeeded_s"]
    assert table(result).count("\n") == 2
