"""The keys between this controller and the hub.

Two directions, two kinds of key:

- the hub presents ``MMANAGER_API_KEY`` on every call to this controller; while
  the hub's key rotates, ``MMANAGER_API_KEY_NEXT`` is accepted as well
  (``accepts_hub_key``, used by ``controller.deps.require_api_key``);
- this controller presents its own key on heartbeats (``HeartbeatKey``): the one
  minted for it on the hub (``mmanager controllers key-create``), given as
  ``MMANAGER_CONTROLLER_KEY`` or in ``MMANAGER_CONTROLLER_KEY_FILE``; without
  one it sends the shared ``MMANAGER_API_KEY``, as the seed did.

The key file is looked at before every heartbeat and re-read when it changed,
so an operator rotates the key by writing the new one into the file: no
restart, and no heartbeat fails for it. A file that becomes unreadable, empty
or weak keeps the last good key in use, with a warning.
"""

from __future__ import annotations

import hmac
import logging
import os

from controller.config import ControllerSettings, read_key_file

log = logging.getLogger(__name__)


def accepts_hub_key(settings: ControllerSettings, token: str) -> bool:
    """Whether ``token`` is the hub's key (or its next one, during a rotation), in constant time."""
    presented = token.encode()
    matches = [hmac.compare_digest(presented, settings.api_key.get_secret_value().encode())]
    if settings.api_key_next is not None:
        matches.append(hmac.compare_digest(presented, settings.api_key_next.get_secret_value().encode()))
    # Both are always compared: which of them matched must not show in the time taken either.
    return any(matches)


class HeartbeatKey:
    """The key heartbeats carry; ``current()`` before each one."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.path = settings.controller_key_file
        self.dev_mode = settings.dev_mode
        fixed = settings.controller_key or settings.api_key
        self._key = fixed.get_secret_value()
        # What the file looked like when it was last read: (inode, mtime, size).
        self._stamp: tuple[int, int, int] | None = None
        if self.path is not None:
            self._key = read_key_file(self.path, dev_mode=self.dev_mode)
            self._stamp = self._stat()

    def current(self) -> str:
        if self.path is None:
            return self._key
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return self._key
        self._stamp = stamp
        try:
            key = read_key_file(self.path, dev_mode=self.dev_mode)
        except ValueError as exc:
            log.warning("%s; heartbeats go on with the previous key", exc)
            return self._key
        if key != self._key:
            self._key = key
            log.info("the key in %s changed: heartbeats now carry the new key", self.path)
        return self._key

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp is not None:
                log.warning("MMANAGER_CONTROLLER_KEY_FILE %s: %s; heartbeats go on with the previous key",
                            self.path, exc.strerror)
                self._stamp = None
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size
