"""Ctrl-C while ``mmanager`` starts: imported first by ``mmanager.cli`` (its imports take a moment), this
module makes SIGINT exit with status 130, without a traceback, until ``restore`` puts the usual handler back
once the commands take Ctrl-C themselves (typer's handling, ``mmanager.commands.session.api_errors``).

Invariant: only Python's default handler is ever replaced, and only in the main thread; ``restore`` puts
back exactly what was there.
"""

from __future__ import annotations

import signal
from typing import Any

INTERRUPTED = 130


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(INTERRUPTED)


_before = signal.getsignal(signal.SIGINT)
if _before is signal.default_int_handler:
    try:
        signal.signal(signal.SIGINT, _exit)
    except ValueError:  # imported outside the main thread, where no handler can be set
        pass


def restore() -> None:
    if signal.getsignal(signal.SIGINT) is _exit:
        signal.signal(signal.SIGINT, _before)
