"""A benchmark stopped with SIGTERM (``timeout``, ``kill``: how a long run is cut short) leaves nothing running:
its hub and its throwaway PostgreSQL cluster stop with it, as with Ctrl-C (bench.common.exit_on_sigterm). An
orphaned hub went on retrying its moves on most of a core, with 2 GiB, and skewed every later measurement."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.poll import wait_until

ROOT = Path(__file__).resolve().parent.parent


def _ours(proc: psutil.Process, since: float) -> bool:
    """A hub or a PostgreSQL server started since ``since``: the benchmark's (the suite's own are older)."""
    try:
        line = " ".join(proc.cmdline())
        return proc.create_time() >= since and ("mmanager.cli hub serve" in line or "postgres -D" in line)
    except psutil.Error:
        return False


@pytest.mark.postgres  # the benchmark starts its own cluster
@pytest.mark.slow
def test_a_benchmark_stopped_with_sigterm_stops_its_hub_and_its_database(tmp_path: Path) -> None:
    since = time.time() - 1
    # A grace of a minute: after the kill the run waits for detection, long past when it is stopped. A short
    # interval: the run waits one interval after every controller beats before it kills.
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench.mass_failover", "--sizes", "20:20:2", "--interval", "1", "--grace", "60",
         "--out", str(tmp_path / "out.json")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(tmp_path / "bench.log").open("wb"))
    running: list[psutil.Process] = []
    try:
        def started() -> list[psutil.Process] | None:
            found = [p for p in psutil.process_iter() if _ours(p, since)]
            kinds = {"hub" if "hub serve" in " ".join(p.cmdline()) else "postgres" for p in found}
            return found if kinds == {"hub", "postgres"} and "killing" in (tmp_path / "bench.log").read_text() else None

        running = wait_until(started, 90, interval=0.5, what="the benchmark's hub and database, and its kill")
        bench.send_signal(signal.SIGTERM)
        code = bench.wait(timeout=60)
        _, alive = psutil.wait_procs(running, timeout=30)
    finally:
        if bench.poll() is None:
            bench.kill()
        for orphan in running:  # not to leave them to the rest of the suite (SIGQUIT: PostgreSQL's immediate stop)
            with contextlib.suppress(psutil.Error):
                orphan.send_signal(signal.SIGQUIT if "postgres -D" in " ".join(orphan.cmdline()) else signal.SIGKILL)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    assert code == 128 + signal.SIGTERM
    assert not (tmp_path / "out.json").exists()
