"""Profile a running process with py-spy while a benchmark drives it, and say where its CPU went.

``py-spy`` (``.venv/bin/pip install py-spy``) samples the process from outside, so the
process runs unchanged. It samples with ``--gil``: only the thread holding the GIL, i.e.
the time spent running Python. Without it py-spy decides from the OS which threads are
busy, and it counts idle ones as busy (``Condition.wait`` in a pool thread, asyncio's
socket ``write`` far beyond the process's system time). The kernel's part, socket sends and
receives, is what ``psutil`` shows as system time; the benchmarks report it beside.
The raw output (one collapsed stack and its count per line) is summarised into the
functions with the most samples, inclusive (anywhere on the stack) and self (the
innermost frame), and the self samples by package (the first folder of the innermost
frame's file: ``sqlalchemy``, ``asyncio``, ``hub``). The inclusive list has the project's
own functions only (``hub/``, ``controller/``, ``mmanager/``): otherwise the event loop's
entry and every middleware, on nearly every stack, would fill it. SQLAlchemy's
async layer runs each query in a greenlet, whose stack py-spy shows without the frames
that led to it: a query's cost is in the inclusive list under SQLAlchemy's and asyncpg's
names, not under the handler that made it.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

_PROJECT = {"hub", "controller", "mmanager"}
_ROOT = str(Path(__file__).resolve().parent.parent) + "/"


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter, else on PATH; None when it is not installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Recording:
    """``py-spy record`` of ``pid`` from start() until stop(); ``summary()`` reads what it wrote."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Recording:
        binary = py_spy()
        if binary is None:
            raise FileNotFoundError("py-spy is not installed: `.venv/bin/pip install py-spy`")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
             "--output", str(self.out), "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        return self

    def __enter__(self) -> Recording:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """py-spy writes its file on SIGINT, as on Ctrl-C."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)
        try:
            _, err = self._proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")

    def summary(self, top: int = 15) -> dict[str, Any]:
        return summarize(self.out.read_text(), top)


_STDLIB = re.compile(r"^.*/lib/python3\.\d+/")


def _frame(raw: str) -> str:
    """``handle (/work/hub/deps.py:80)`` -> ``handle (hub/deps.py)``: one name per function, paths short."""
    name, _, where = raw.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif _STDLIB.match(path):
        path = _STDLIB.sub("", path)
    elif path.startswith(_ROOT):
        path = path[len(_ROOT):]
    return f"{name} ({path})" if path else name


def summarize(collapsed: str, top: int = 15) -> dict[str, Any]:
    """From py-spy's raw format: total samples, and the ``top`` functions by inclusive and by self share."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ") and
                  not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        for name in set(frames):
            if _package(name) in _PROJECT:
                inclusive[name] += n

    if not total:
        return {"samples": 0, "inclusive": [], "self": [], "packages": []}

    def share(counter: collections.Counter[str], key: str = "function") -> list[dict[str, Any]]:
        return [{key: name, "share": round(n / total, 3)} for name, n in counter.most_common(top)]

    return {"samples": total, "inclusive": share(inclusive), "self": share(own), "packages": share(packages, "package")}


def _package(frame: str) -> str:
    path = frame.rpartition(" (")[2].rstrip(")")
    head = path.lstrip("/").split("/", 1)[0]
    return head.removesuffix(".py") or "?"


def print_summary(summary: dict[str, Any], title: str, packages: int | None = 10, own: int | None = 15,
                  inclusive: int | None = 0) -> None:
    """A ``summary()`` as the benchmarks print it: ``title``, the busiest packages, the project's functions
    by inclusive time (``inclusive`` of them; None: all), then functions by own time."""
    print(f"\n{title} ({summary['samples']} samples on CPU), by package:")
    for row in summary["packages"][:packages]:
        print(f"  {row['share']:6.1%}  {row['package']}")
    if inclusive != 0:
        print("inclusive, the project's functions:")
        for row in summary["inclusive"][:inclusive]:
            print(f"  {row['share']:6.1%}  {row['function']}")
    print("self:")
    for row in summary["self"][:own]:
        print(f"  {row['share']:6.1%}  {row['function']}")


def profile_dir(arg: Path | Literal[True] | None, workdir: Path) -> Path | None:
    """Where ``--profile [DIR]`` keeps the raw samples: DIR, or a folder in the run's workdir; None: no profile."""
    if arg is None:
        return None
    return workdir / "profiles" if arg is True else Path(arg)
