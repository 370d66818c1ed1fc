"""What every pipeline step shares: atomic output files, progress reports, and the features JSON's layout.

Invariant: an output path holds either nothing or a complete file (it is written under a temporary name in the
same directory and renamed into place only once whole), and the progress file is always one whole JSON object.
The features JSON is a JSON array written one element per line, so a reader can stream it line by line; any
other valid layout of the same array is read too, whole.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

import orjson

PROGRESS_ENV = "MMANAGER_PROGRESS_FILE"
PRINT_EVERY = 10_000


def count_arg(text: str) -> int:
    """An argparse type: a count of records, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, not {text!r}")
    return value


class StepError(Exception):
    """Input or options a step cannot work with; the step prints it and exits with status 2."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM (a job's timeout or cancel: ``docker stop``) raises SystemExit, so that
    ``atomic_output`` removes its temporary file rather than leave it in the outputs to be collected."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file that becomes ``path`` once the block ends without an exception (never a partial file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide an output from a collector running as another user
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as out:
        out.write(data)


def count_lines(path: str | Path) -> int:
    """The number of lines in ``path`` (a last line without a newline counts): a progress total."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


class FeaturesWriter:
    """Writes a JSON array one element per line: ``[``, the elements separated by ``,`` newlines, ``]``."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.count = 0
        out.write(b"[")

    def write_many(self, elements: list[bytes]) -> None:
        if elements:
            self.out.write(b"\n" if self.count == 0 else b",\n")
            self.out.write(b",\n".join(elements))
            self.count += len(elements)

    def close(self) -> None:
        self.out.write(b"\n]\n")


def read_features(path: str | Path) -> Iterator[dict[str, Any]]:
    """The elements of a features JSON array, streamed when it has ``FeaturesWriter``'s layout (any other
    layout is read whole)."""
    with open(path, "rb") as f:
        streamed: bool | None = f.readline().strip() == b"["
        for line in f if streamed else ():
            line = line.strip()
            if line in (b"", b"]"):
                continue
            try:
                element = orjson.loads(line[:-1] if line.endswith(b",") else line)
            except orjson.JSONDecodeError:
                if streamed is True:  # the first element is not one line: not this layout
                    streamed = False
                    break
                raise
            streamed = None  # an element was read: the layout is this one
            yield element
        if streamed is False:
            f.seek(0)
            yield from orjson.loads(f.read())


class Progress:
    """The seed's progress lines on stdout every ``PRINT_EVERY`` records, and the JobProgress JSON
    ``{done, total, unit, rate}`` in ``$MMANAGER_PROGRESS_FILE`` (when set) at most every ``interval`` s."""

    def __init__(self, total: int | None = None, unit: str = "records", interval: float = 0.25,
                 stream: IO[str] | None = None) -> None:
        self.total = total
        self.unit = unit
        self.interval = interval
        self.stream = stream if stream is not None else sys.stdout
        self.path = os.environ.get(PROGRESS_ENV) or None
        self.started = time.perf_counter()
        self.done = self.success = self.failed = 0
        self._next_print = PRINT_EVERY
        self._last_write = float("-inf")

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def add(self, success: int = 0, failed: int = 0) -> None:
        self.update(self.success + success, self.failed + failed)

    def update(self, success: int, failed: int) -> None:
        """The counts so far (absolute); prints and writes when due."""
        self.success, self.failed = success, failed
        self.done = success + failed
        if self.done >= self._next_print:
            print(f"Processed {self.done} {self.unit} ({self.rate:.1f} rec/s, {self.success} success, "
                  f"{self.failed} failed)", file=self.stream, flush=True)
            self._next_print = (self.done // PRINT_EVERY + 1) * PRINT_EVERY
        if self.path and time.perf_counter() - self._last_write >= self.interval:
            self.write()

    def write(self) -> None:
        """The progress file rewritten whole, atomically (a reader never sees half of it)."""
        if self.path:
            self._last_write = time.perf_counter()
            write_atomic(self.path, orjson.dumps({"done": self.done, "total": self.total, "unit": self.unit,
                                                  "rate": round(self.rate, 1)}))

    def finish(self) -> None:
        """The last report: the total becomes what was done."""
        self.total = self.done
        self.write()
