"""The failover-with-pre-pull benchmark's small version (issue 25): a 5 MiB image, one run per mode, on real
engines, a real registry and real processes. Timing is not asserted; what is deterministic is: both failovers
land on the target healthy, the one with pre-pull pulled nothing (the image was there, and placement said so),
the one without pulled the image."""

import pytest

from bench.failover_prefetch import measure, table

pytestmark = pytest.mark.slow


def test_failover_prefetch_small() -> None:
    result = measure(image_mb=5, runs=1)
    assert result["image_mb"] == 5 and result["image_bytes"] > 5 * 1024**2 and result["runs"] == 1
    warm, cold = result["modes"]["with pre-pull"], result["modes"]["without pre-pull"]
    assert warm["failovers_that_pulled"] == 0 and warm["placements"] == ["image present"]
    assert warm["prefetch_p50_s"] is not None and warm["pull_p50_s"] is None
    assert cold["failovers_that_pulled"] == 1 and cold["pull_p50_s"] is not None and cold["prefetch_p50_s"] is None
    for mode in (warm, cold):
        assert 0 < mode["healthy_min_s"] <= mode["healthy_p50_s"] <= mode["healthy_max_s"]
    assert table(result).count("\n") == 3
