"""The status read's two halves kept off the database and the renderer: ``Gathered`` sends the reads that
come together as one statement, ``Rendered`` keeps each service's answer until its row changes.

Invariant: an answer is never older than its call; a row is always read by a statement sent after the
call was made, and an answer is reused only while that row is equal to the one it was rendered from.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy.sql.base import Executable

from hub.db import Database


class Rendered:
    """The last answer rendered from each of the most recently read keys' rows, used again while the row read
    is the same (equal, column for column) as the one it was rendered from; rendered anew when it is not.

    At most ``most`` keys are kept; past that the one kept longest goes. A read still reads its row every
    time (an answer is never older than its read), only the rendering is skipped.
    """

    def __init__(self, most: int) -> None:
        self.most = most
        self._last: dict[Any, tuple[Mapping[str, Any], bytes]] = {}

    def get(self, key: Any, row: Mapping[str, Any], render: Callable[[], bytes]) -> bytes:
        last = self._last.get(key)
        if last is not None and (last[0] is row or last[0] == row):
            return last[1]
        body = render()
        if last is None and len(self._last) >= self.most:
            del self._last[next(iter(self._last))]
        self._last[key] = (row, body)
        return body


class Gathered:
    """Reads of one row by its key, made together: the calls that come while a read is on its way are
    answered by the next one, a single statement for all their keys (as a DataLoader does).

    ``statement`` reads the rows whose ``key`` column is one of the list parameter ``keys`` (``any_of``). A
    call's row always comes from a statement sent after the call was made, never from one already on its
    way, so it sees at least what was committed before it was called, as its own statement would. At most
    ``in_flight`` statements are on their way at once, each for at most ``most`` keys; calls for one key
    share its row. A statement that fails is tried again for each of its keys alone, so one key the
    database refuses (a NUL character) fails only its own calls. Under load (32 status reads at once) one
    statement serves several calls, and each pays a fraction of asyncpg's round trip and the pool's
    checkout; a lone call pays one task switch more than a statement of its own.
    """

    def __init__(self, db: Database, statement: Executable, key: str, *, most: int = 256, in_flight: int = 2) -> None:
        self.db = db
        self.statement = statement
        self.key = key
        self.most = most
        self.in_flight = in_flight
        self._waiting: dict[Any, list[asyncio.Future[Mapping[str, Any] | None]]] = {}
        # Senders running. Counted down as a sender's last act, not by a done-callback a loop pass later:
        # a call made in between would otherwise see no free slot and wait with nobody to send it.
        self._sending = 0
        self._senders: set[asyncio.Task[None]] = set()

    async def first(self, key: Any) -> Mapping[str, Any] | None:
        """The row of ``key``, or None when there is none."""
        future: asyncio.Future[Mapping[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._sending < self.in_flight:
            self._sending += 1
            # A context of its own: what it logs is no one caller's (not the request id of the call that
            # happened to start it).
            sender = asyncio.create_task(self._send(), context=contextvars.Context())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await future

    async def _send(self) -> None:
        try:
            while self._waiting:
                keys = list(self._waiting)[:self.most]
                batch = {k: self._waiting.pop(k) for k in keys}
                try:
                    rows = await self.db.all(self.statement, {"keys": keys})
                except asyncio.CancelledError:
                    _fail(batch.values(), None)
                    raise
                except Exception as exc:
                    if len(batch) == 1:
                        _fail(batch.values(), exc)
                        continue
                    for k, futures in batch.items():
                        await self._alone(k, futures)
                    continue
                self._answer(batch, rows)
        finally:
            self._sending -= 1

    async def _alone(self, key: Any, futures: list[asyncio.Future[Mapping[str, Any] | None]]) -> None:
        try:
            rows = await self.db.all(self.statement, {"keys": [key]})
        except asyncio.CancelledError:
            _fail([futures], None)
            raise
        except Exception as exc:
            _fail([futures], exc)
            return
        self._answer({key: futures}, rows)

    def _answer(self, batch: Mapping[Any, list[asyncio.Future[Mapping[str, Any] | None]]],
                rows: Sequence[Mapping[str, Any]]) -> None:
        found = {row[self.key]: row for row in rows}
        for k, futures in batch.items():
            row = found.get(k)
            for future in futures:
                if not future.done():
                    future.set_result(row)


def _fail(batches: Iterable[list[asyncio.Future[Any]]], exc: BaseException | None) -> None:
    """Fail every call still waiting in ``batches`` (lists of futures) with ``exc``; None: cancel them."""
    for futures in batches:
        for future in futures:
            if not future.done():
                if exc is None:
                    future.cancel()
                else:
                    future.set_exception(exc)
