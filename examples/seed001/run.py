"""Seed 001's pipeline through a hub, as a user runs it: a TSV (made here, or given) uploaded as an artifact, the
three steps of ``pipeline.json`` (convert -> features -> enhance, each a job in the reference model image)
submitted as one pipeline, followed while each running step's job reports its progress (records done, records a
second), and the enhanced JSONL downloaded.

    python -m examples.seed001.run [--tsv Ec.tsv | --records 52000] [--limit N] [--out DIR]
        [--hub URL] [--token TOKEN] [--image IMAGE]

The hub and token come as the CLI's do (``--hub``/``--token``, else ``MMANAGER_HUB_URL``/``MMANAGER_TOKEN``,
else the login profile). The upload is named ``Ec.tsv`` whatever the local file's name: the steps read
``/inputs/Ec.tsv``. Exit status 0 when the pipeline succeeded and its output was downloaded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
SPEC = HERE / "pipeline.json"
PLACEHOLDER = "<the id of the uploaded Ec.tsv>"
UPLOAD_NAME = "Ec.tsv"
RESULT_STEP, RESULT_PATH = "enhance", "Ec_enhanced.jsonl"
FINAL = frozenset({"succeeded", "failed", "cancelled"})
CHUNK = 1 << 20


@dataclass
class Run:
    """What a run did: the pipeline as it ended, the downloaded output, the client's timings (seconds) and every
    distinct progress each step's job showed while it was followed."""

    pipeline: dict[str, Any]
    output: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    progress: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.pipeline["status"] == "succeeded" and self.output is not None


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def upload(hub: httpx.Client, path: Path, name: str = UPLOAD_NAME) -> dict[str, Any]:
    """The file streamed as an artifact named ``name``; its ArtifactOut."""
    r = hub.post("/api/artifacts", params={"name": name}, content=_chunks(path),
                 headers={"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)})
    _check(r, "upload")
    return r.json()


def pipeline_spec(artifact_id: str, limit: int | None = None, image: str | None = None,
                  spec_path: Path = SPEC) -> dict[str, Any]:
    """``pipeline.json`` with the upload's id in place, each step given ``--limit`` and ``image`` when set."""
    spec: dict[str, Any] = copy.deepcopy(json.loads(spec_path.read_text()))
    for step in spec["steps"]:
        step["inputs"] = [{**ref, "artifact": artifact_id} if isinstance(ref, dict) and ref.get("artifact") == PLACEHOLDER
                          else ref for ref in step.get("inputs", [])]
        if limit is not None:
            step["args"] = [*step.get("args", []), "--limit", str(limit)]
        if image is not None:
            step["image"] = image
    return spec


def _count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def describe(progress: dict[str, Any]) -> str:
    """``12,288/51,990 records, 6,100/s``: a job's progress as the run shows it."""
    total, rate = progress.get("total"), progress.get("rate")
    return (_count(progress["done"]) + (f"/{_count(total)}" if total is not None else "")
            + f" {progress.get('unit') or ''}" + (f", {rate:,.0f}/s" if rate is not None else "")).strip()


def follow(hub: httpx.Client, pipeline_id: str, poll: float = 0.25, timeout: float | None = None,
           say: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The pipeline once it ended, and each step's distinct progress seen on the way; each change said."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[str, list[dict[str, Any]]] = {}
    shown: dict[str, tuple[str, str]] = {}
    while True:
        r = hub.get(f"/api/pipelines/{pipeline_id}")
        _check(r, "pipeline status")
        pipeline = r.json()
        for job in pipeline["steps"]:
            step, progress = job["step"], job.get("progress")
            if progress and (not seen.get(step) or seen[step][-1] != progress):
                seen.setdefault(step, []).append(progress)
            line = (job["status"], describe(progress) if progress else job.get("status_message") or "")
            if shown.get(step) != line:
                shown[step] = line
                say(f"  {step:<9} {line[0]:<9} {line[1]}".rstrip())
        if pipeline["status"] in FINAL:
            return pipeline, seen
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"pipeline {pipeline_id} still {pipeline['status']} after {timeout} s")
        time.sleep(poll)


def download(hub: httpx.Client, pipeline: dict[str, Any], out_dir: Path, step: str = RESULT_STEP,
             path: str = RESULT_PATH) -> Path:
    """The step's output ``path`` into ``out_dir`` (written under a temporary name, renamed once whole)."""
    [job] = [j for j in pipeline["steps"] if j["step"] == step]
    r = hub.get(f"/api/jobs/{job['id']}/artifacts")
    _check(r, "the outputs' list")
    [artifact] = [a for a in r.json() if a["path"] == path]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / Path(path).name
    partial = target.with_name(f".{target.name}.part")
    with hub.stream("GET", artifact["url"]) as response:
        _check(response, "download")
        with open(partial, "wb") as f:
            for chunk in response.iter_bytes(CHUNK):
                f.write(chunk)
    partial.replace(target)
    return target


def run(hub: httpx.Client, tsv: Path, out_dir: Path, limit: int | None = None, image: str | None = None,
        poll: float = 0.25, timeout: float | None = None, say: Callable[[str], None] = print) -> Run:
    """Upload, submit, follow, download: the whole run."""
    started = time.perf_counter()
    artifact = upload(hub, tsv)
    uploaded = time.perf_counter()
    say(f"uploaded {tsv} ({artifact['size']:,} bytes) as artifact {artifact['id']}")
    r = hub.post("/api/pipelines", json=pipeline_spec(artifact["id"], limit, image))
    _check(r, "submit")
    pipeline = r.json()
    say(f"pipeline {pipeline['name']} {pipeline['id']}: {' -> '.join(j['step'] for j in pipeline['steps'])}")
    pipeline, progress = follow(hub, pipeline["id"], poll, timeout, say)
    ended = time.perf_counter()
    result = Run(pipeline, progress=progress)
    if pipeline["status"] == "succeeded":
        result.output = download(hub, pipeline, out_dir)
    done = time.perf_counter()
    result.seconds = {"upload": uploaded - started, "pipeline": ended - uploaded, "download": done - ended,
                      "total": done - started}
    return result


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        response.read()
        raise SystemExit(f"{what}: the hub answered {response.status_code}: {response.text[:500]}")


def main(argv: list[str] | None = None) -> int:
    from mmanager.client.config import resolve
    from modelserver.pipeline import dataset
    from modelserver.pipeline.streams import count_arg

    parser = argparse.ArgumentParser(prog="python -m examples.seed001.run", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tsv", type=Path, help="the UniProt-style TSV to run (default: one made here)")
    source.add_argument("--records", type=count_arg, default=52_000, help="rows of the TSV made here")
    parser.add_argument("--limit", type=count_arg, default=None, help="each step stops after this many records")
    parser.add_argument("--out", type=Path, default=Path("seed001-out"), help="where the enhanced JSONL goes")
    parser.add_argument("--hub", default=None, help="the hub's URL")
    parser.add_argument("--token", default=None, help="an API token")
    parser.add_argument("--image", default=None, help="the steps' image (default: pipeline.json's)")
    parser.add_argument("--timeout", type=float, default=None, help="give up following after this many seconds")
    args = parser.parse_args(argv)

    url, token = resolve(args.hub, args.token)
    tsv = args.tsv
    if tsv is None:
        tsv = args.out / UPLOAD_NAME
        args.out.mkdir(parents=True, exist_ok=True)
        dataset.write(tsv, args.records, 0)
        print(f"made {tsv} ({args.records:,} rows)")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(60.0, read=600.0)) as hub:
        result = run(hub, tsv, args.out, args.limit, args.image, timeout=args.timeout)
    status = result.pipeline["status"]
    if not result.succeeded:
        failed = [j for j in result.pipeline["steps"] if j["status"] not in ("succeeded", "pending")]
        why = "; ".join(f"{j['step']} {j['status']}: {j.get('status_message') or ''}" for j in failed)
        print(f"pipeline {result.pipeline['id']} {status}: {why}", file=sys.stderr)
        return 1
    print(f"pipeline {result.pipeline['id']} succeeded in {result.seconds['total']:.1f} s "
          f"(upload {result.seconds['upload']:.1f}, steps {result.seconds['pipeline']:.1f}, "
          f"download {result.seconds['download']:.1f}): {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
