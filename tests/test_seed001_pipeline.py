"""Seed 001's pipeline through the hub end to end, as a user runs it (``examples/seed001/run.py``) on a real lab
(a hub, two controllers, the Docker engine, PostgreSQL) with the reference model image: a TSV made here uploaded,
the three steps run as jobs, the enhanced JSONL downloaded, in the seed's format, with one line per valid row,
the same bytes as the one-process runner gives on the same TSV, and each step's job (and the CLI's table of the
pipeline) showing its records done. Then the seed-001 benchmark in small (bench/seed001_pipeline.py) on the same
lab: both sides run and give the same bytes, and every step is cut into its parts (correctness only, no timing)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import orjson
import pytest

from bench import seed001_pipeline
from examples.seed001 import run as seed_run
from modelserver.pipeline import dataset
from tests.support.lab import Lab, running_lab
from tests.support.pg import create_database
from tests.support.procs import MMANAGER

ROWS = 500
# The dataset makes one row in 100 invalid, in turn: four kinds the converter skips, then an ambiguity code it
# keeps (its features are an error, so enhance leaves that record as it was).
VALID = ROWS - 4
UNCHANGED = 1
RECORD_KEYS = {"sequence", "protein_aa", "host", "expression", "extra_features", "metadata"}
PARTS = ("dispatch", "to_create", "container_start", "run", "work", "python_and_imports", "collect", "total")


@pytest.fixture(scope="module")
def seed001_lab(pg_server: str, modelserver_image: str, docker_client: docker.DockerClient,
                tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One lab (tests/support/lab.py) with the reference model image for this module's tests."""
    workdir = tmp_path_factory.mktemp("seed001-lab")
    db_url = asyncio.run(create_database(pg_server, "seed001"))
    with running_lab(db_url, workdir, request, docker_client,
                     hub_env={"MMANAGER_ARTIFACT_STORE": str(workdir / "artifacts")}) as lab:
        yield lab


def test_seed001_runs_as_a_pipeline_of_jobs_and_gives_the_one_process_runners_output(
        seed001_lab: Lab, modelserver_image: str, tmp_path: Path) -> None:
    tsv = tmp_path / "Ec.tsv"
    dataset.write(tsv, ROWS, seed=1)
    # The one-process runner on the same TSV, meanwhile.
    local = subprocess.Popen([sys.executable, "-m", "modelserver.pipeline.run", "--input", str(tsv),
                              "--output-dir", str(tmp_path / "local")], stdout=subprocess.DEVNULL)
    said: list[str] = []
    with seed001_lab.hub() as hub:
        result = seed_run.run(hub, tsv, tmp_path / "hub", image=modelserver_image, poll=0.1, timeout=120,
                              say=said.append)
    assert local.wait(timeout=120) == 0

    steps = {job["step"]: job for job in result.pipeline["steps"]}
    assert result.pipeline["status"] == "succeeded", steps
    assert list(steps) == ["convert", "features", "enhance"]
    assert {step: job["status"] for step, job in steps.items()} == dict.fromkeys(steps, "succeeded")

    # The seed's enhanced JSONL: one line per valid row, each a record with its expression enhanced.
    assert result.output is not None
    body = result.output.read_bytes()
    records = [orjson.loads(line) for line in body.splitlines()]
    assert len(records) == VALID
    assert all(set(r) == RECORD_KEYS for r in records)
    units = [r["expression"]["unit"] for r in records]
    assert units.count("estimated") == UNCHANGED and units.count("estimated_enhanced") == VALID - UNCHANGED
    enhanced = next(r["expression"] for r in records if r["expression"]["unit"] == "estimated_enhanced")
    assert set(enhanced) == {"value", "unit", "assay", "confidence", "original_value"}
    assert enhanced["assay"] == "model_enhanced_heuristic"
    assert {r["extra_features"]["source_file"] for r in records} == {"Ec.tsv"}
    # The same bytes as the one-process runner's.
    assert body == (tmp_path / "local" / "Ec_enhanced.jsonl").read_bytes()

    # Each step's job shows the records it did, and how fast.
    features = steps["features"]["progress"]
    assert (features["done"], features["total"], features["unit"]) == (VALID, VALID, "records")
    assert features["rate"] > 0
    assert steps["enhance"]["progress"]["done"] == VALID
    assert steps["convert"]["progress"]["done"] == ROWS
    # What the run said as it followed: each step's status and its records done.
    assert any(line.split()[:2] == ["features", "succeeded"] and f"{VALID:,}/{VALID:,} records" in line
               for line in said), said
    # And the CLI's table of the pipeline's steps.
    shown = subprocess.run([*MMANAGER, "pipelines", "show", result.pipeline["id"]], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "MMANAGER_CONFIG": str(tmp_path / "cli.json"),
                                            "MMANAGER_HUB_URL": seed001_lab.dep.hub().url,
                                            "MMANAGER_TOKEN": seed001_lab.token})
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if line.split()[:1] == ["features"]]
    assert "succeeded" in row and f"{VALID}/{VALID} records" in row.replace(",", ""), shown.stdout


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
