"""Step 2, ``features``: the JSONL dataset into the seed's Evo2 features JSON (a JSON array, one element a record).

By default the features are computed here by ``modelserver.features`` (the heuristic backend's torch kernel),
a batch of records at a time; ``--service URL`` asks a running evo2 model service's ``/predict/batch`` instead
(100 sequences a request), the seed's microservice way. Element i answers record i (``request_id``
``record_<i>``): ``status`` ``success`` with the features in ``output``, or ``error`` with ``error`` saying why
(a sequence that is empty or has a letter outside ``ACGTN``) and no ``output``. Invariant: one element per
input record, in the input's order; a record's features do not depend on the batch it was computed in.

    python -m modelserver.pipeline.features --input Ec.jsonl --output Ec_evo2_features.json [--limit N]
        [--batch-size 2048] [--device auto|cpu|cuda] [--threads 1] [--service URL]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from modelserver.pipeline.streams import (
    FeaturesWriter,
    Progress,
    StepError,
    atomic_output,
    count_arg,
    count_lines,
    sigterm_exits,
)

TASK = "extract_features"
SERVICE = "evo2-enhanced"
# The seed's output fields, in its order (the kernel computes a few more, which the seed's format has not).
OUTPUT_FIELDS = ("sequence_length", "avg_confidence", "max_confidence", "min_confidence", "std_confidence",
                 "avg_loglik", "perplexity", "gc_content", "codon_entropy")
DEFAULT_BATCH = 2048
# The kernel's maths is elementwise and gains little from more threads, while OpenMP threads that wait for a
# peer the scheduler took away lose much on a shared CPU; the step's second core serialises instead.
DEFAULT_THREADS = 1
SERVICE_BATCH = 100
_NOT_DNA = re.compile("[^ACGTN]")

# A sequence's answer: its output, or why it has none. A Compute answers a batch of sequences that passed
# ``problem``, in order.
Answer = tuple[dict[str, Any] | None, str | None]
Compute = Callable[[list[str]], list[Answer]]


def problem(sequence: bytes) -> str | None:
    """Why an upper-cased sequence gets no features, or None."""
    if not sequence:
        return "sequence is empty"
    if not sequence.translate(None, b"ACGTN"):
        return None
    text = sequence.decode("utf-8", "replace")
    bad = _NOT_DNA.search(text)
    assert bad is not None
    return f"sequence has {bad.group()!r} at position {bad.start()} (0-based); expected DNA (ACGTN)"


def kernel(device: str = "auto") -> Compute:
    """Features by ``modelserver.features``' torch kernel on ``device`` (``auto``: CUDA when torch sees one)."""
    import torch

    from modelserver import features

    if device == "cuda" and not torch.cuda.is_available():
        raise StepError("--device cuda, but torch sees no GPU")
    where = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                         "cpu" if device == "auto" else device)

    def compute(sequences: list[str]) -> list[Answer]:
        packed = features.encode(sequences)
        if where.type != "cpu":
            packed = features.Packed(*(getattr(packed, f).to(where) for f in
                                       ("codes", "row_seq", "first_row", "windows", "lengths")))
        columns = features.extract_tensors(packed)
        values = [columns[name].tolist() for name in OUTPUT_FIELDS]
        answers: list[Answer] = []
        for j, sequence in enumerate(sequences):
            out: dict[str, Any] = {"sequence": sequence}
            for name, column in zip(OUTPUT_FIELDS, values, strict=True):
                out[name] = column[j]
            out["backend"] = features.BACKEND
            out["model_version"] = features.MODEL_VERSION
            answers.append((out, None))
        return answers

    return compute


def service(url: str, timeout: float = 300.0) -> Compute:
    """Features from a running evo2 model service at ``url`` (``/predict/batch``, one connection kept alive).
    Sequences the service would refuse are answered here, so one bad record does not fail its whole batch."""
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.netloc, timeout=timeout)
    prefix = parts.path.rstrip("/")

    def call(method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):  # a kept-alive connection the server closed is reopened once
            try:
                connection.request(method, prefix + path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
                if attempt == 2:
                    raise
        answer: dict[str, Any] = orjson.loads(data)
        if response.status >= 400 or not answer.get("success"):
            error = answer.get("error") or {}
            raise ServiceRefused(f"{response.status} {error.get('code')}: {error.get('details') or answer.get('message')}",
                                 response.status)
        return answer

    info = call("GET", "/model/info")["data"]
    if TASK not in info.get("tasks", []):
        raise ServiceRefused(f"the service at {url} serves {info.get('model_type')}, which has no {TASK} task")
    max_chars = int((info.get("limits") or {}).get("max_sequence_chars") or info.get("max_sequence_length") or 0)

    def compute(sequences: list[str]) -> list[Answer]:
        answers: list[Answer] = [
            (None, f"sequence has {len(s)} letters; the service takes at most {max_chars}")
            if max_chars and len(s) > max_chars else (None, None) for s in sequences]
        good = [i for i, (_, error) in enumerate(answers) if error is None]
        for chunk in (good[k:k + SERVICE_BATCH] for k in range(0, len(good), SERVICE_BATCH)):
            body = orjson.dumps({"sequences": [sequences[i] for i in chunk], "task_type": TASK})
            try:
                predictions = call("POST", "/predict/batch", body)["data"]["predictions"]
            except ServiceRefused as e:
                if e.status >= 500:  # the service's trouble, not the records': the step fails (and is retried)
                    raise
                for i in chunk:
                    answers[i] = (None, f"the service refused the batch: {e}")
                continue
            for i, prediction in zip(chunk, predictions, strict=True):
                details = prediction["details"]
                out = {"sequence": sequences[i], **{name: details[name] for name in OUTPUT_FIELDS},
                       "backend": details.get("backend"), "model_version": details.get("model_version")}
                answers[i] = (out, None)
        return answers

    return compute


class ServiceRefused(StepError):
    """The model service answered with an error (``status``, its HTTP status), or is not an evo2 service."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


_UPPER = bytes(range(256)).upper()
_SEQUENCE_FIRST = b'{"sequence":"'


def read_sequences(path: str | Path, limit: int | None = None) -> Iterator[bytes]:
    """The upper-cased ``sequence`` of each record of a JSONL file, as bytes (empty when it has none). A line
    that starts with the sequence, as step 1 writes them, has it cut out without parsing the rest."""
    start = len(_SEQUENCE_FIRST)
    with open(path, "rb") as f:
        for line in itertools.islice((line for line in f if not line.isspace()), limit):
            if line.startswith(_SEQUENCE_FIRST):
                end = line.find(b'"', start)
                raw = line[start:end]
                if end > 0 and raw.isascii() and b"\\" not in raw:
                    yield raw.translate(_UPPER)
                    continue
            value = orjson.loads(line).get("sequence")
            yield value.upper().encode("utf-8") if isinstance(value, str) else b""


def _timed(compute: Compute, sequences: list[str]) -> tuple[list[Answer], float]:
    started = time.perf_counter()
    return (compute(sequences) if sequences else []), time.perf_counter() - started


def elements(sequences: Iterable[bytes], compute: Compute, batch_size: int,
             progress: Progress | None = None) -> Iterator[list[bytes]]:
    """The features JSON's elements, serialised, one list a batch. A batch computes in a worker thread while
    this one reads the next and serialises the one before: the kernel runs without the GIL, and an HTTP call
    waits without it."""
    it = iter(sequences)
    index = 0
    pending: deque[tuple[list[Answer], list[int], Future[tuple[list[Answer], float]]]] = deque()

    def finish() -> list[bytes]:
        nonlocal index
        answers, good, future = pending.popleft()
        computed, seconds = future.result()
        for i, answer in zip(good, computed, strict=True):
            answers[i] = answer
        share_ms = round(seconds * 1000 / len(answers))  # whole milliseconds, as the seed's service reports
        out = []
        failed = 0
        for output, error in answers:
            metadata = {"request_id": f"record_{index}", "processing_time_ms": share_ms, "service": SERVICE}
            element: dict[str, Any]
            if output is not None:
                element = {"task": TASK, "status": "success", "output": output, "metadata": metadata}
            else:
                element = {"task": TASK, "status": "error", "error": error, "metadata": metadata}
                failed += 1
            out.append(orjson.dumps(element))
            index += 1
        if progress is not None:
            progress.add(success=len(answers) - failed, failed=failed)
        return out

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="features") as pool:
        while batch := list(itertools.islice(it, batch_size)):
            answers: list[Answer] = [(None, problem(raw)) for raw in batch]
            good = [i for i, (_, error) in enumerate(answers) if error is None]
            future = pool.submit(_timed, compute, [batch[i].decode("ascii") for i in good])
            pending.append((answers, good, future))
            if len(pending) > 1:
                yield finish()
        while pending:
            yield finish()


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (at most the CPUs the process may use) for the block."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if threads > 1:  # more than one needs the CPUs the process may use (the backends' module is slow to load)
        from modelserver.backends import cpu_limit

        threads = max(1, min(threads, cpu_limit() or threads))
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def extract(input_path: str | Path, output_path: str | Path, limit: int | None = None,
            batch_size: int = DEFAULT_BATCH, device: str = "auto", service_url: str | None = None,
            threads: int = DEFAULT_THREADS) -> Progress:
    """The features of the JSONL at ``input_path`` written to ``output_path``; the counts, in the progress."""
    total = count_lines(input_path)
    progress = Progress(total=min(total, limit) if limit is not None else total)
    if service_url:
        print(f"Using the evo2 service at {service_url}", flush=True)
        compute = service(service_url)
        batch_size = max(batch_size, SERVICE_BATCH)
    else:
        compute = kernel(device)
    with _torch_threads(None if service_url else threads), atomic_output(output_path) as out:
        writer = FeaturesWriter(out)
        for chunk in elements(read_sequences(input_path, limit), compute, batch_size, progress):
            writer.write_many(chunk)
        writer.close()
    progress.finish()
    print(f"Processing rate: {progress.rate:.1f} records/s ({progress.success} success, {progress.failed} failed)",
          flush=True)
    print(f"✓ Evo2 features extracted: {output_path}", flush=True)
    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelserver.pipeline.features", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="the JSONL dataset (step 1's output)")
    parser.add_argument("--output", required=True, help="the features JSON to write")
    parser.add_argument("--limit", type=count_arg, default=None, help="process at most this many records")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="records a kernel batch")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the kernel runs")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch's intra-op threads")
    parser.add_argument("--service", default=None, metavar="URL",
                        help="ask the evo2 model service at URL instead of running the kernel here")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.threads < 1:
        parser.error("--batch-size and --threads must be at least 1")
    try:
        with sigterm_exits():
            extract(args.input, args.output, args.limit, args.batch_size, args.device, args.service, args.threads)
    except (StepError, OSError, orjson.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
