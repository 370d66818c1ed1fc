"""Seed 001's Evo2 heuristic features: records a second through the reference model service's
``/predict/batch`` (the torch backend, vectorised over each batch), against the same maths record by
record in plain Python (``modelserver.features.reference``, the seed's way), side by side in one run,
and against the rate seed 001 reports for its heuristic service (245 records a second).

The records are synthetic coding sequences (fixed seed): ATG, random codons, a stop codon, lengths
uniform between ``--min-length`` and ``--max-length`` nucleotides (about E. coli's gene lengths). The
service (``MODEL_TYPE=evo2``, a process on 127.0.0.1 with the CPU's threads) is sent batches of 100
(the API's limit) by ``--clients`` keep-alive connections at once, the requests encoded before the clock
starts and the answers decoded after it stops (so the load generator, on the same cores, costs little);
the Python baseline runs over a sample of the
records in this process. Every answer is checked against the baseline for a sample of records.

    python -m bench.model_features [--records 20000] [--clients 2] [--baseline-records 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import exchange, exit_on_sigterm, post_request, say
from modelserver import features
from tests.support.modelserver import build_weights, model_process

SEED_001_RECORDS_PER_S = 245.0
BATCH = 100
CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in ("TAA", "TAG", "TGA")]


def records(count: int, min_length: int, max_length: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        codons = rng.randint(min_length // 3, max_length // 3) - 2
        out.append("ATG" + "".join(rng.choice(CODONS) for _ in range(codons)) + rng.choice(("TAA", "TAG", "TGA")))
    return out


def baseline(sequences: list[str]) -> tuple[float, list[dict[str, Any]]]:
    started = time.perf_counter()
    results = [features.reference(seq) for seq in sequences]
    return len(sequences) / (time.perf_counter() - started), results


async def _connection(port: int, requests: list[bytes], answers: dict[int, bytes], queue: asyncio.Queue[int]) -> None:
    """One keep-alive connection sending the prepared requests it takes from ``queue``; the answers' bodies
    kept as bytes (decoded after the clock stops: the client's JSON is not the service's cost)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not queue.empty():
            index = queue.get_nowait()
            answers[index] = await exchange(reader, writer, requests[index])
    finally:
        writer.close()


async def _served(port: int, sequences: list[str], clients: int) -> tuple[float, dict[int, Any]]:
    requests = [post_request(port, "/predict/batch", {"sequences": sequences[i:i + BATCH], "task_type": "extract_features"})
                for i in range(0, len(sequences), BATCH)]
    raw: dict[int, bytes] = {}
    # Warm-up: the first batch pays for lazy initialisation.
    warm: asyncio.Queue[int] = asyncio.Queue()
    warm.put_nowait(0)
    await _connection(port, requests, {}, warm)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(requests)):
        queue.put_nowait(index)
    started = time.perf_counter()
    await asyncio.gather(*(_connection(port, requests, raw, queue) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    answers = {index: json.loads(body)["data"]["predictions"] for index, body in raw.items()}
    return len(sequences) / elapsed, answers


def check(answers: dict[int, Any], sequences: list[str], expected: list[dict[str, Any]]) -> None:
    """The service's features equal the per-record baseline's (the records both computed)."""
    for i, want in enumerate(expected):
        got = answers[i // BATCH][i % BATCH]["details"]
        for key, value in want.items():
            if isinstance(value, float):
                assert abs(got[key] - value) <= 1e-4 * max(1.0, abs(value)), (i, key, got[key], value)


def measure(*, records_count: int, clients: int, baseline_records: int, min_length: int, max_length: int,
            rounds: int) -> dict[str, Any]:
    sequences = records(records_count, min_length, max_length)
    say(f"{len(sequences)} records, mean length {statistics.mean(map(len, sequences)):.0f} nt")
    with tempfile.TemporaryDirectory(prefix="mm-bench-features-") as tmp:
        model_dir = build_weights(Path(tmp), "evo2")
        with model_process(model_dir, "evo2") as url:
            port = int(url.rsplit(":", 1)[1])
            served = []
            for round_ in range(rounds):
                rate, answers = asyncio.run(_served(port, sequences, clients))
                say(f"round {round_ + 1}: service {rate:,.0f} records/s")
                served.append(rate)
    python_rate, expected = baseline(sequences[:baseline_records])
    say(f"per-record Python: {python_rate:,.0f} records/s")
    check(answers, sequences, expected)
    service_rate = statistics.median(served)
    return {"records": len(sequences), "mean_length_nt": round(statistics.mean(map(len, sequences))),
            "clients": clients, "batch": BATCH, "service_records_per_s": round(service_rate),
            "python_records_per_s": round(python_rate), "vs_python": round(service_rate / python_rate, 1),
            "seed_001_records_per_s": SEED_001_RECORDS_PER_S,
            "vs_seed_001": round(service_rate / SEED_001_RECORDS_PER_S, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--baseline-records", type=int, default=1000)
    parser.add_argument("--min-length", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    exit_on_sigterm()
    print(json.dumps(measure(records_count=args.records, clients=args.clients,
                             baseline_records=min(args.baseline_records, args.records), min_length=args.min_length,
                             max_length=args.max_length, rounds=args.rounds), indent=2))


if __name__ == "__main__":
    main()
