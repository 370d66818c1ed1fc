"""Reads ``MMANAGER_CONTROLLERS`` again when its file changes, or on SIGHUP (``ControllerRegistry.reload``).

It runs on every replica, not only the leader: each replica presents the entries' ``api_key``s to their
controllers from its own memory (``HubSettings.key_for``), so each must read the new file itself, and a
SIGHUP reaches one process. The table writes it leads to are idempotent and audited only where they change
a row, so replicas reading the same file apply each change once between them.

Invariant: a file is applied at most once per change of its (mtime, size, inode), so a bad file is
reported once, not at every look; SIGHUP applies it whatever its stamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from hub.services.controllers import ControllerRegistry
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int] | None


def stamp_of(path: Path) -> Stamp:
    """What tells one version of the file from another (None: it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class ControllersFileWatch(LoopService):
    name = "controllers-file"

    def __init__(self, registry: ControllerRegistry, path: Path, interval: float) -> None:
        super().__init__(interval)
        self.registry = registry
        self.path = path
        # The version last applied (or refused): the one read at the start until the first change.
        self.applied: Stamp = stamp_of(path)
        self._signalled: set[asyncio.Task[bool]] = set()

    async def run_once(self) -> None:
        stamp = stamp_of(self.path)
        if stamp != self.applied:
            self.applied = stamp
            await self.registry.reload("file changed")

    def on_sighup(self) -> None:
        self.applied = stamp_of(self.path)
        task = asyncio.ensure_future(self.registry.reload("SIGHUP"))
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    def install_sighup(self) -> bool:
        """``kill -HUP <hub pid>`` reloads; False where signals cannot be handled (not the main thread:
        a test's or ``mmanager dev``'s embedded hub), which then relies on the file's changes alone."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.on_sighup)
            return True
        return False

    def remove_sighup(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
