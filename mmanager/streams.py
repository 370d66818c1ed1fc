"""Log output, bounded: followed streams that always give back what they hold, and tails that keep the newest bytes.

A followed log (``?follow=true``) holds resources for as long as it is open: on a
controller a Docker connection and a thread blocked reading it, on the hub a
connection to the controller and a slot of the caller's. ``ClosingStream`` gives
them back in exactly one place, ``aclose()``, and ``ClosingStreamingResponse`` calls
it however the response ends: the stream ran out, the client went away, the
request was cancelled, or the response never started streaming at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ClosingStream:
    """The chunks of ``source``, with one idempotent ``aclose()``.

    ``aclose()`` first runs the ``on_close`` callbacks, which are synchronous so a
    cancelled caller cannot skip them (slots are given back even then), then awaits
    the source's own ``aclose`` and ``close``, shielded from cancellation.
    """

    def __init__(self, source: AsyncIterator[bytes], close: Callable[[], Awaitable[None]] | None = None) -> None:
        self._source = source
        self._close = close
        self._callbacks: list[Callable[[], None]] = []
        self._closed = False

    def on_close(self, callback: Callable[[], None]) -> ClosingStream:
        self._callbacks.append(callback)
        return self

    def __aiter__(self) -> ClosingStream:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await anext(self._source)
        except StopAsyncIteration:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for callback in self._callbacks:
            callback()
        with anyio.CancelScope(shield=True):
            source_close = getattr(self._source, "aclose", None)
            if source_close is not None:
                await source_close()
            if self._close is not None:
                await self._close()


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its iterator whatever happens (Starlette's leaves it open when the
    client goes away in the middle of a send)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def newest_bytes(chunks: Iterable[bytes], limit: int) -> bytes:
    """The last ``limit`` bytes of ``chunks``, holding little more than ``limit`` in memory at any time.

    When something was cut, the partial first line goes too, so the answer starts
    at a line's beginning (unless one line alone is longer than ``limit``).
    """
    kept: deque[bytes] = deque()
    size = 0
    cut = False
    for chunk in chunks:
        if not chunk:
            continue
        kept.append(chunk)
        size += len(chunk)
        while size - len(kept[0]) >= limit:
            size -= len(kept.popleft())
            cut = True
    data = b"".join(kept)
    if len(data) > limit:
        data = data[-limit:]
        cut = True
    if cut:
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data = data[newline + 1 :]
    return data


def newest_text(text: str, limit: int) -> str:
    """``newest_bytes`` for text already in memory (the hub's copy of a controller's answer)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return newest_bytes([data], limit).decode("utf-8", errors="ignore")
