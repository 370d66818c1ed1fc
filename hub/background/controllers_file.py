"""Reads ``MMANAGER_CONTROLLERS`` again when its file changes, or on SIGHUP (``ControllerRegistry.reload``).

It runs on every replica, not only the leader: each replica presents the entries' ``api_key``s to their
controllers from its own memory (``HubSettings.key_for``), so each must read the new file itself, and a
SIGHUP reaches one process. The table writes it leads to are idempotent and audited only where they change
a row, so replicas reading the same file apply each change once between them.

Invariant: a version of the file, told by its (mtime, size, inode), is applied once two looks in a row saw
it (a file caught half-written is not), and marked applied only once its reload returned: a bad file is
reported once, not at every look, and a reload the database broke off is tried again at the next look. SIGHUP
applies the file whatever its stamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from hub.services.controllers import ControllerRegistry
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int] | None

# The watches SIGHUP reloads: one handler for the process, removed with the last of them (two hubs in one
# process, a test's, must not remove each other's).
_on_hup: list[ControllersFileWatch] = []


def stamp_of(path: Path) -> Stamp:
    """What tells one version of the file from another (None: it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _hup() -> None:
    for watch in list(_on_hup):
        watch.on_sighup()


class ControllersFileWatch(LoopService):
    name = "controllers-file"

    def __init__(self, registry: ControllerRegistry, path: Path, interval: float) -> None:
        super().__init__(interval)
        self.registry = registry
        self.path = path
        # The version last applied (or refused): the one read at the start until the first change.
        self.applied: Stamp = stamp_of(path)
        # The version the previous look saw: a new one is applied when the next look sees it too.
        self.seen: Stamp = self.applied
        self._signalled: set[asyncio.Task[None]] = set()

    async def run_once(self) -> None:
        stamp = stamp_of(self.path)
        if stamp == self.applied:
            return
        if stamp != self.seen:
            self.seen = stamp  # still being written, perhaps: applied once the next look agrees
            return
        await self.registry.reload("file changed")
        self.applied = stamp

    def running(self) -> set[asyncio.Task[Any]]:
        # Stopping waits for a SIGHUP's reload too: it must not be cut off by the database closing under it.
        return super().running() | set(self._signalled)

    def on_sighup(self) -> None:
        stamp = stamp_of(self.path)
        task = asyncio.ensure_future(self._reload_signalled(stamp))
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def _reload_signalled(self, stamp: Stamp) -> None:
        try:
            await self.registry.reload("SIGHUP")
        except Exception:  # the database failed: the next SIGHUP or change of the file tries again
            log.exception("MMANAGER_CONTROLLERS: the reload on SIGHUP failed; send SIGHUP again")
            return
        self.applied = self.seen = stamp

    def install_sighup(self) -> bool:
        """``kill -HUP <hub pid>`` reloads; False where signals cannot be handled (not the main thread:
        a test's or ``mmanager dev``'s embedded hub), which then relies on the file's changes alone."""
        if not _on_hup:
            # Signal handlers exist only in the main thread of a Unix event loop (NotImplementedError elsewhere;
            # RuntimeError or ValueError in another thread), as for hub.app's SIGUSR1 dump.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _hup)
                _on_hup.append(self)
                return True
            return False
        _on_hup.append(self)
        return True

    def remove_sighup(self) -> None:
        if self not in _on_hup:
            return
        _on_hup.remove(self)
        if not _on_hup:
            # As in install_sighup: outside the main thread of a Unix loop there is no handler to remove.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
