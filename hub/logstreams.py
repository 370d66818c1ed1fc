"""How many followed logs are open on this hub replica, per user and in all.

A followed log stays open as long as its client wants, holding a connection to
a controller; without a cap one user could open thousands. ``acquire`` takes a
slot or refuses with 429 ``TOO_MANY_LOG_STREAMS``; the release it returns is
idempotent and is run when the stream closes (``mmanager.streams``). Slots live
in this replica's memory, like the rate limiter's buckets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hub.errors import TooManyLogStreams

# Streams end when their clients leave, not on a schedule; this is a hint, not a promise.
RETRY_AFTER = 5


class LogStreamSlots:
    def __init__(self, total: int, per_user: int) -> None:
        self.total = total
        self.per_user = per_user
        self._open: Counter[int] = Counter()

    def open_for(self, user_id: int) -> int:
        return self._open[user_id]

    @property
    def open(self) -> int:
        return sum(self._open.values())

    def acquire(self, user_id: int, username: str) -> Callable[[], None]:
        if self._open[user_id] >= self.per_user:
            raise TooManyLogStreams(
                f"{username!r} follows {self.per_user} logs already, the most one user may; close one first",
                {"max_log_streams_per_user": self.per_user},
                RETRY_AFTER,
            )
        if self.open >= self.total:
            raise TooManyLogStreams(
                f"this hub serves {self.total} followed logs already; retry later",
                {"max_log_streams": self.total},
                RETRY_AFTER,
            )
        self._open[user_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[user_id] -= 1
                if not self._open[user_id]:
                    del self._open[user_id]

        return release
