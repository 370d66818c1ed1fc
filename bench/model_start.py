"""The reference model service's start-to-first-prediction time: from ``docker run`` of
mmanager/modelserver:latest (the real engine, its port published on 127.0.0.1) until a ``/predict``
answers 200, and until ``/health`` first does, per model type; ``--runs`` starts each, medians reported.
Beside them, in the same run, the floor: the busybox example image (``httpd``, nothing to load) from
``docker run`` until its ``/health`` answers, what the engine and the port publishing alone cost.
The images are built first if needed (scripts/build-modelserver-image.sh, cached).

    python -m bench.model_start [--runs 5] [--types dnabert2 lucaone evo2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import docker
import httpx

from bench.common import exit_on_sigterm, say
from examples.images import EXAMPLE_IMAGE, build_example_image

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "mmanager/modelserver:latest"
BODIES = {"dnabert2": {"sequence": "ATGCGTACGTAGCTAGCTAGCTAGC", "task_type": "promoter_prediction"},
          "lucaone": {"sequence": "ATGCGTACGTAGCTAGCTAGCTAGC", "task_type": "embedding"},
          "evo2": {"sequence": "ATGCGTACGTAGCTAGCTAGCTAGC", "task_type": "extract_features"}}


def build_image() -> None:
    subprocess.run(["bash", str(ROOT / "scripts/build-modelserver-image.sh")], check=True)


def _first_200(call: Any, deadline: float) -> float:
    while time.perf_counter() < deadline:
        try:
            if call().status_code == 200:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise TimeoutError("no answer")


def one_start(client: docker.DockerClient, model_type: str | None) -> dict[str, float]:
    """One ``docker run`` of the model service serving ``model_type`` (None: the example image)."""
    container_port = "8000/tcp" if model_type else "5000/tcp"
    # A port Docker picks, on loopback only (docker-py's stubs know no None for the host port).
    ports: dict[str, Any] = {container_port: ("127.0.0.1", None)}
    started = time.perf_counter()
    container = client.containers.run(IMAGE if model_type else EXAMPLE_IMAGE, detach=True,
                                      environment={"MODEL_TYPE": model_type} if model_type else None, ports=ports,
                                      labels={"mmanager.bench": "model_start"})
    try:
        container.reload()
        while not (published := container.ports.get(container_port)):
            container.reload()
        url = f"http://127.0.0.1:{published[0]['HostPort']}"
        deadline = started + 120
        healthy = _first_200(lambda: httpx.get(f"{url}/health", timeout=2), deadline)
        if model_type is None:
            return {"health_s": healthy - started}
        predicted = _first_200(lambda: httpx.post(f"{url}/predict", json=BODIES[model_type], timeout=10), deadline)
        return {"health_s": healthy - started, "first_prediction_s": predicted - started}
    finally:
        container.remove(force=True)


def measure(runs: int, types: list[str]) -> dict[str, Any]:
    client = docker.from_env()
    out: dict[str, Any] = {"image": IMAGE, "runs": runs,
                           "image_size_mb": round(client.images.get(IMAGE).attrs["Size"] / 1e6)}
    for model_type in [None, *types]:
        one_start(client, model_type)  # warm the page cache, as a server that has run it once has
        results = [one_start(client, model_type) for _ in range(runs)]
        name = model_type or "example_floor"
        out[name] = {key: round(statistics.median(r[key] for r in results), 2) for key in results[0]}
        say(f"{name}: {out[name]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--types", nargs="+", default=list(BODIES))
    args = parser.parse_args()
    exit_on_sigterm()
    build_image()
    build_example_image()
    print(json.dumps(measure(args.runs, args.types), indent=2))


if __name__ == "__main__":
    main()
