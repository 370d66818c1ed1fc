"""Dynamic batching against none: the reference model service (DNABERT2-style promoter prediction)
under ``--clients`` concurrent clients, each sending ``/predict`` calls back to back, once with
batching on and once with ``MODEL_BATCHING=0`` (every call run alone), side by side in one run.

Each client is a keep-alive connection sending requests encoded before the run (the load generator shares
the machine's cores with the service, so it does as little as it can). Each phase: a warm-up, then
``--seconds`` of load; requests a second, p50 and p99 latency of the calls
begun in the window. The two services take turns for ``--rounds`` rounds (the order alternating) and
the medians are reported, so whatever else the machine does falls on both alike. The sequences are
random promoter-length DNA (``--length`` nt, fixed seed); the answers of both services are checked to
be the same for every sequence.

    python -m bench.model_batching [--clients 32] [--seconds 10] [--rounds 3] [--length 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.common import exchange, exit_on_sigterm, percentile, post_request, say
from tests.support.modelserver import build_weights, model_process


def sequences(count: int, length: int, seed: int = 2) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("ACGT") for _ in range(length)) for _ in range(count)]


async def _client(port: int, requests: list[tuple[str, bytes]], offset: int, until: float, measure_from: float,
                  latencies: list[float], answers: dict[str, bytes]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while (started := time.perf_counter()) < until:
            seq, request = requests[i % len(requests)]
            i += 1
            answer = await exchange(reader, writer, request)
            if started >= measure_from:
                latencies.append(time.perf_counter() - started)
            answers[seq] = answer
    finally:
        writer.close()


async def _phase(url: str, pool: list[str], clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1])
    requests = [(seq, post_request(port, "/predict", {"sequence": seq, "task_type": "promoter_prediction"}))
                for seq in pool]
    latencies: list[float] = []
    raw: dict[str, bytes] = {}
    now = time.perf_counter()
    measure_from, until = now + warmup, now + warmup + seconds
    await asyncio.gather(*(_client(port, requests, k * 7, until, measure_from, latencies, raw) for k in range(clients)))
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    assert p50 is not None and p99 is not None
    answers = {seq: json.loads(body)["data"]["prediction"] for seq, body in raw.items()}
    return {"requests_per_s": len(latencies) / seconds, "p50_ms": p50 * 1000, "p99_ms": p99 * 1000,
            "answers": answers}


def measure(*, clients: int, seconds: float, rounds: int, length: int, warmup: float = 2.0) -> dict[str, Any]:
    pool = sequences(256, length)
    phases: dict[str, list[dict[str, Any]]] = {"batched": [], "unbatched": []}
    with ExitStack() as stack:
        model_dir = build_weights(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mm-bench-"))),
                                  "dnabert2")
        urls = {"batched": stack.enter_context(model_process(model_dir, "dnabert2", MODEL_BATCHING="1")),
                "unbatched": stack.enter_context(model_process(model_dir, "dnabert2", MODEL_BATCHING="0"))}
        for round_ in range(rounds):
            order = ["batched", "unbatched"] if round_ % 2 == 0 else ["unbatched", "batched"]
            for name in order:
                result = asyncio.run(_phase(urls[name], pool, clients, seconds, warmup))
                say(f"round {round_ + 1} {name}: {result['requests_per_s']:.0f} req/s, "
                    f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
                phases[name].append(result)
        batch_sizes = httpx.get(f"{urls['batched']}/metrics", timeout=10).text
    # Batched or not, every sequence gets the same answer.
    alone = {seq: value for result in phases["unbatched"] for seq, value in result["answers"].items()}
    together = {seq: value for result in phases["batched"] for seq, value in result["answers"].items()}
    differing = [seq for seq in alone.keys() & together.keys() if abs(alone[seq] - together[seq]) > 1e-6]
    assert not differing, f"{len(differing)} sequences answered differently batched and alone"
    out: dict[str, Any] = {"clients": clients, "seconds": seconds, "rounds": rounds, "length_nt": length}
    for name, results in phases.items():
        out[name] = {key: round(statistics.median(r[key] for r in results), 1)
                     for key in ("requests_per_s", "p50_ms", "p99_ms")}
    out["throughput_ratio"] = round(out["batched"]["requests_per_s"] / out["unbatched"]["requests_per_s"], 2)
    out["mean_batch_size"] = _mean_batch(batch_sizes)
    return out


def _mean_batch(exposition: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        if "batch_size" in family.name:
            total = {s.name: s.value for s in family.samples if s.name.endswith(("_sum", "_count"))}
            sums = [v for k, v in total.items() if k.endswith("_sum")]
            counts = [v for k, v in total.items() if k.endswith("_count")]
            if sums and counts and counts[0]:
                return round(sums[0] / counts[0], 1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=300)
    args = parser.parse_args()
    exit_on_sigterm()
    print(json.dumps(measure(clients=args.clients, seconds=args.seconds, rounds=args.rounds, length=args.length),
                     indent=2))


if __name__ == "__main__":
    main()
