"""Seed 001's three steps in one process, in order (the seed's ``microservice_enhance_expression.py``).

Each step reads the previous one's file from ``--output-dir`` (``<stem>.jsonl``, ``<stem>_evo2_features.json``,
``<stem>_enhanced.jsonl``, named after the input), exactly as the steps run as jobs do, so this is the same
work as the pipeline of jobs without the jobs: the baseline a benchmark sets them against, and a quick run
for development. It prints the seed's banners, each step's time and the total.

    python -m modelserver.pipeline.run --input Ec.tsv --output-dir DIR [--limit N] [--service URL]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from modelserver.pipeline import convert, enhance, features
from modelserver.pipeline.streams import StepError, count_arg, sigterm_exits

RULE = "=" * 62


@dataclass
class Result:
    outputs: dict[str, Path]
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0


def _banner(title: str) -> None:
    print(f"\n{RULE}\n{title}\n{RULE}", flush=True)


def run(input_path: str | Path, output_dir: str | Path, limit: int | None = None, service_url: str | None = None,
        batch_size: int = features.DEFAULT_BATCH, device: str = "auto",
        threads: int = features.DEFAULT_THREADS) -> Result:
    """The three steps over ``input_path`` into ``output_dir``; the outputs and each step's seconds."""
    started = time.perf_counter()
    out = Path(output_dir)
    stem = Path(input_path).stem
    result = Result(outputs={"1_convert": out / f"{stem}.jsonl", "2_evo2_features": out / f"{stem}_evo2_features.json",
                             "3_enhance_expression": out / f"{stem}_enhanced.jsonl"})
    jsonl, features_json, enhanced = result.outputs.values()
    print(f"{RULE}\nMICROSERVICE EXPRESSION ENHANCEMENT PIPELINE\n{RULE}", flush=True)
    print(f"Input: {input_path}\nOutput Directory: {out}\nUse Evo2: True\n"
          f"Features: {'the evo2 service at ' + service_url if service_url else 'the torch kernel, in process'}\n{RULE}")

    _banner("STEP 1: Converting TSV to JSONL")
    step = time.perf_counter()
    convert.convert(input_path, jsonl, limit)
    result.seconds["convert"] = time.perf_counter() - step

    _banner("STEP 2: Extracting Evo2 Features " + ("(Microservice)" if service_url else "(torch kernel)"))
    step = time.perf_counter()
    features.extract(jsonl, features_json, limit, batch_size, device, service_url, threads)
    result.seconds["features"] = time.perf_counter() - step

    _banner("STEP 3: Enhancing Expression Estimates")
    step = time.perf_counter()
    enhance.enhance(jsonl, features_json, enhanced, limit)
    result.seconds["enhance"] = time.perf_counter() - step

    result.total_seconds = time.perf_counter() - started
    _banner("PIPELINE COMPLETED SUCCESSFULLY")
    print("Step times: " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in result.seconds.items()))
    print(f"Total time: {result.total_seconds:.2f}s\n\nOutput files:")
    for name, path in result.outputs.items():
        print(f"  {name}: {path}")
    print(RULE, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelserver.pipeline.run", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="the UniProt-style TSV")
    parser.add_argument("--output-dir", required=True, help="where the three outputs go")
    parser.add_argument("--limit", type=count_arg, default=None, help="at most this many records (a quick run)")
    parser.add_argument("--service", default=None, metavar="URL", help="features from the evo2 service at URL")
    parser.add_argument("--batch-size", type=int, default=features.DEFAULT_BATCH, help="records a kernel batch")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the kernel runs")
    parser.add_argument("--threads", type=int, default=features.DEFAULT_THREADS, help="torch's intra-op threads")
    args = parser.parse_args(argv)
    try:
        with sigterm_exits():
            run(args.input, args.output_dir, args.limit, args.service, args.batch_size, args.device, args.threads)
    except (StepError, OSError, orjson.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
