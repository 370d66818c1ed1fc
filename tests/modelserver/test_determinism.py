"""The same input gives the same answer: twice in a row, and from ``python -m modelserver`` processes
started afresh (with batching off) as from the served app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.modelserver.test_api import envelope
from tests.support.modelserver import model_process

SEQUENCES = ["TATAAAAGGCGCGCCGCGTATAAATAGG", "ACGT" * 100, "GGGGCCCCNNNNAT" * 9, "A" * 5120]


def answers(url: str, task: str | None = None) -> list[Any]:
    with httpx.Client(base_url=url, timeout=30) as client:
        single = [envelope(client.post("/predict", json={"sequence": s, "task_type": task})) for s in SEQUENCES]
        batch = envelope(client.post("/predict/batch", json={"sequences": SEQUENCES, "task_type": task}))
    return [(d["prediction"], d["confidence"], d["details"]) for d in single] + [
        (d["prediction"], d["confidence"], d["details"]) for d in batch["predictions"]]


def test_the_same_answers_twice_and_across_restarts(model_dir: Path, dnabert2: str, lucaone: str) -> None:
    first = answers(dnabert2)
    assert answers(dnabert2) == first
    assert first[: len(SEQUENCES)] == first[len(SEQUENCES):]
    for _ in range(2):
        with model_process(model_dir, "dnabert2", MODEL_BATCHING="0") as url:
            assert answers(url) == first
    embeddings = answers(lucaone, "embedding")
    with model_process(model_dir, "lucaone", MODEL_MAX_BATCH_SIZE="3") as url:
        assert answers(url, "embedding") == embeddings
        info = envelope(httpx.get(f"{url}/model/info"))
        assert info["batching"]["max_batch_size"] == 3
