"""Waiting for an event instead of sleeping for a guessed time: poll a check until it holds or a deadline
passes. A check that never holds fails the test with ``what`` and the check's last value."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

# A server that is not up yet, or answers an error for now: the sync waits poll through these by default.
HTTP_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError, httpx.HTTPStatusError)


def wait_until(check: Callable[[], T], timeout: float, what: str = "condition", *, interval: float = 0.2,
               retry_on: tuple[type[BaseException], ...] = HTTP_ERRORS) -> T:
    """Call ``check()`` until it returns something truthy, and return that; ``retry_on`` errors count as
    not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


async def eventually(check: Callable[[], T | Awaitable[T]], within: float = 3.0, what: str = "condition", *,
                     interval: float = 0.01, retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """``wait_until`` for a running event loop: ``check`` is a plain predicate or returns an awaitable, and
    the loop's other tasks (the code under test) run between calls."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)
