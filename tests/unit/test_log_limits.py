"""The pure parts of the log limits: slots per user and in all, tails cut to their newest bytes, streams that
give back what they hold exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hub.errors import TooManyLogStreams
from hub.logstreams import LogStreamSlots
from mmanager.streams import ClosingStream, newest_bytes, newest_text


def test_slots_per_user_and_in_all_and_a_release_counts_once() -> None:
    slots = LogStreamSlots(total=3, per_user=2)
    first = slots.acquire(1, "alice")
    slots.acquire(1, "alice")
    with pytest.raises(TooManyLogStreams) as refused:
        slots.acquire(1, "alice")
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "5"}
    assert refused.value.details["max_log_streams_per_user"] == 2
    slots.acquire(2, "bob")
    with pytest.raises(TooManyLogStreams) as full:
        slots.acquire(3, "carol")
    assert full.value.details["max_log_streams"] == 3
    first()
    first()
    assert (slots.open_for(1), slots.open) == (1, 2)
    slots.acquire(3, "carol")


def test_newest_bytes_keeps_the_end_from_a_line_start() -> None:
    lines = [f"line-{i}\n".encode() for i in range(1000)]
    kept = newest_bytes(iter(lines), 64)
    assert len(kept) <= 64 and kept.endswith(b"line-999\n") and kept.startswith(b"line-")
    assert newest_bytes(iter(lines[:3]), 64) == b"line-0\nline-1\nline-2\n"
    # One line longer than the limit: its end, cut.
    assert newest_bytes([b"x" * 100 + b"\n"], 10) == b"x" * 9 + b"\n"
    assert newest_text("é" * 100, 11) == "é" * 5


async def test_a_closing_stream_closes_once_whether_read_to_the_end_or_not() -> None:
    events: list[str] = []

    async def source() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    async def close() -> None:
        events.append("close")

    read = ClosingStream(source(), close).on_close(lambda: events.append("release"))
    assert [chunk async for chunk in read] == [b"a", b"b"]
    await read.aclose()
    assert events == ["release", "close"]

    events.clear()
    never_read = ClosingStream(source(), close).on_close(lambda: events.append("release"))
    await never_read.aclose()
    await never_read.aclose()
    assert events == ["release", "close"]
