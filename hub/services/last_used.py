"""When a credential (a controller key, a user's token) was last used: ``last_used_at``, a hint written at
most once a minute per credential and per replica, batched by ``flush`` (the heartbeat flusher's), never a
database write per request.

Invariant: a use noted and not yet written is written by the next ``flush`` that succeeds (a failed one keeps
it); the row's condition keeps the column coarse across replicas too.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import or_, update

from hub.db import Database
from hub.models import utcnow

TOUCH_EVERY = 60.0

Id = TypeVar("Id", int, str)


class LastUsed(Generic[Id]):
    """The uses of ``model``'s rows (a model with ``id`` and ``last_used_at``) this replica saw."""

    def __init__(self, db: Database, model: Any, max_entries: int | None = None) -> None:
        self.db = db
        self.model = model
        # Past this many remembered ids the memory of when each was noted is emptied (a bound, not an
        # eviction policy: at worst an id is written twice within TOUCH_EVERY).
        self.max_entries = max_entries
        # Id -> when this process last noted it used (monotonic seconds); the ids noted since the last flush.
        self._touched: dict[Id, float] = {}
        self._used: set[Id] = set()

    def note(self, row_id: Id, now: float) -> None:
        last = self._touched.get(row_id)
        if last is None or now - last >= TOUCH_EVERY:
            self._touched[row_id] = now
            self._used.add(row_id)

    async def flush(self) -> None:
        """Write ``last_used_at`` of the rows used since the last flush."""
        if not self._used:
            return
        used, self._used = self._used, set()
        if self.max_entries is not None and len(self._touched) >= self.max_entries:
            self._touched.clear()
        at = utcnow()
        model = self.model
        try:
            async with self.db.session() as session:
                # Other replicas write it too; the condition keeps it coarse across all of them.
                await session.execute(
                    update(model)
                    .where(model.id.in_(sorted(used)),
                           or_(model.last_used_at.is_(None),
                               model.last_used_at < at - timedelta(seconds=TOUCH_EVERY)))
                    .values(last_used_at=at))
        except BaseException:
            self._used |= used
            raise
