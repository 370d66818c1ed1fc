"""The stats sampling benchmark's small version (issue 29): three containers, one timed round each way, on the
real engine. Timing is not asserted; what is: every round sampled every container (the benchmark refuses a round
that did not), and every container it made is gone afterwards."""

import docker

from bench.stats_sampling import measure, table
from mmanager.wire import LABEL_CONTROLLER


async def test_stats_sampling_small(docker_client: docker.DockerClient, example_image: str) -> None:
    result = await measure(sizes=[3], rounds_per_size=1, gap=0)
    [row] = result["sizes"]
    assert row["containers"] == 3
    for way in ("two_readings", "one_shot_16", "one_shot"):
        assert row[way]["rounds"] == 1 and 0 < row[way]["median_s"] <= row[way]["max_s"]
    assert table(result).count("\n") == 2
    assert not docker_client.containers.list(all=True, filters={"label": f"{LABEL_CONTROLLER}={result['server_id']}"})
