"""Seed 001's pipeline benchmark in small (bench/seed001_pipeline.py): its own measurement, on a few hundred
records, on the session's ``seed001_lab``: both sides run and give the same bytes, and every step is cut into
its parts. Correctness only, no timing."""

from __future__ import annotations

from pathlib import Path

import docker

from bench import seed001_pipeline
from tests.support.lab import Lab

PARTS = ("dispatch", "to_create", "container_start", "run", "work", "python_and_imports", "collect", "total")


def test_the_pipeline_benchmark_runs_both_sides_and_cuts_each_step(seed001_lab: Lab, modelserver_image: str,
                                                                      docker_client: docker.DockerClient,
                                                                      tmp_path: Path) -> None:
    with seed001_lab.hub() as hub:
        result = seed001_pipeline.measure(hub, docker_client, tmp_path, records=100, image=modelserver_image,
                                          costs=False)
    [run] = result["rounds"]
    assert run["outputs_equal"] and result["records"] == 100
    assert result["hub_seconds_p50"] > 0 and result["one_process_seconds_p50"] > 0
    assert set(run["one_process"]["steps"]) == {"convert", "features", "enhance"}
    steps = run["hub"]["steps"]
    assert [s["step"] for s in steps] == ["convert", "features", "enhance"]
    for step in steps:
        assert all(step[part] is not None and step[part] >= 0 for part in PARTS), step
    assert set(run["hub"]["output_bytes"]) == {"convert:Ec.jsonl", "features:Ec_evo2_features.json",
                                               "enhance:Ec_enhanced.jsonl"}
