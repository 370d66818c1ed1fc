"""Pulls in progress on this controller, as Docker's streamed pull reports them, for ``GET /images/pulls``.

A ``PullTracker`` folds one pull's progress events into layers and bytes done (fed from the pull's pool
thread); ``Pulls`` holds the trackers of the pulls running now, each under a token of its own (two pulls
of one image are two entries), and forgets each when its pull ends. Invariant: a snapshot only reads; each tracker is written by one thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from mmanager.wire import ImagePullProgress

# Docker's statuses for a layer that is on the host at the end.
_DONE = frozenset({"Pull complete", "Already exists"})
# A layer downloaded whole (its bytes all fetched).
_DOWNLOADED = frozenset({"Verifying Checksum", "Download complete", "Extracting", "Pull complete"})


class PullTracker:
    """One pull's layers, from the events of ``client.api.pull(..., stream=True, decode=True)``."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.token = -1  # ``Pulls`` gives it one
        self.started = time.monotonic()
        # layer id -> [bytes downloaded, bytes in all (0: not said yet), done]
        self._layers: dict[str, list[Any]] = {}

    def event(self, event: dict[str, Any]) -> None:
        layer, status = event.get("id"), str(event.get("status") or "")
        if not layer or status.startswith("Pulling from"):
            return  # the image's own lines (its tag, its digest), not a layer's
        state = self._layers.setdefault(str(layer), [0, 0, False])
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and isinstance(detail, dict):
            state[0] = int(detail.get("current") or 0)
            state[1] = int(detail.get("total") or state[1])
        elif status in _DOWNLOADED and state[1]:
            state[0] = state[1]
        if status in _DONE:
            state[2] = True

    def progress(self) -> ImagePullProgress:
        layers = list(self._layers.copy().values())  # a copy in one step: the pull's thread adds layers
        return ImagePullProgress(
            image=self.image, layers_total=len(layers), layers_done=sum(1 for s in layers if s[2]),
            bytes_done=sum(s[0] for s in layers), bytes_total=sum(s[1] for s in layers),
            seconds=round(time.monotonic() - self.started, 3))


class Pulls:
    """The pulls running on this controller now."""

    def __init__(self) -> None:
        self._running: dict[int, PullTracker] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()

    def begin(self, image: str) -> PullTracker:
        tracker = PullTracker(image)
        with self._lock:
            tracker.token = next(self._tokens)
            self._running[tracker.token] = tracker
        return tracker

    def end(self, tracker: PullTracker) -> None:
        with self._lock:
            self._running.pop(tracker.token, None)

    def snapshot(self) -> list[ImagePullProgress]:
        with self._lock:
            trackers = list(self._running.values())
        return [tracker.progress() for tracker in trackers]
