"""How every SDK call is written once for both clients: a method is a generator of steps (``Call``: one HTTP
request; ``Pause``: wait between polls; ``Notify``: hand a value to the caller's callback) that returns its
result, and the client's runner (``mmanager.client.transport``) carries the steps out, with httpx's sync or
async client.

Invariant: no step does I/O itself, so the same body serves ``Client`` (the ``op`` answers the result) and
``AsyncClient`` (it answers a coroutine); ``Bound[Sync]`` / ``Bound[Async]`` tell the type checker which.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

from typing_extensions import TypeVar as DefaultTypeVar


class Sync:
    """The mode of ``Client``: each call answers its result."""


class Async:
    """The mode of ``AsyncClient``: each call answers a coroutine (a stream, an async iterator)."""


M = DefaultTypeVar("M", Sync, Async, default=Sync)
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One HTTP request. ``path`` is the hub's, unless ``base`` (a service's gateway URL) is given; ``token``:
    the bearer sent instead of the hub's (a service key), ``hub_token`` False sends none of the hub's;
    ``waits``: the hub answers once a long operation ends, so the answer gets the long read timeout of such a
    wait; ``resume``: for a stream, the ``params`` that open it again from its end after a quiet spell;
    ``upload``: a file sent as the raw request body; ``download``: the answer's body saved to a file."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    base: str | None = None
    token: str | None = None
    hub_token: bool = True
    read: Literal["json", "text", "none"] = "json"
    waits: bool = False
    resume: Mapping[str, Any] | None = None
    upload: Upload | None = None
    download: Download | None = None


@dataclass(frozen=True)
class Upload:
    """A file sent as a call's raw body by the runner, which opens it and reads it a chunk at a time as the
    request goes (never whole into memory), with its size as ``Content-Length``; ``progress(done_bytes,
    total_bytes)`` is called before the first chunk and after each (awaited when it answers an awaitable)."""

    path: str
    progress: Callable[[int, int], Any] | None = None


@dataclass(frozen=True)
class Download:
    """A call's answer saved by the runner to ``path`` (its folder made if missing): written a chunk at a
    time to a temporary file beside it, whose sha256 must be ``sha256`` (hex, when given) before it is
    renamed to ``path``, so that ``path`` is either the whole, checked file or untouched. The call answers
    ``path``. ``progress(done_bytes, total_bytes)`` as for an ``Upload`` (``total``: ``size``, else the
    answer's ``Content-Length``, else 0)."""

    path: str
    sha256: str | None = None
    size: int | None = None
    progress: Callable[[int, int], Any] | None = None


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Notify:
    callback: Callable[[Any], Any]
    value: Any


Step = Call | Pause | Notify
Steps = Generator[Step, Any, T]


class Bound(Generic[M]):
    """Something whose ``op``s run on a client's runner: ``Bound[Sync]`` for ``Client``'s, ``Bound[Async]``
    for ``AsyncClient``'s."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner


def _run(fn: Callable[..., Steps[Any]], owner: Bound[Any], /, *args: Any, **kwargs: Any) -> Any:
    return owner._runner.run(fn(owner, *args, **kwargs))


def _lines(fn: Callable[..., Steps[Any]], owner: Bound[Any], /, *args: Any, **kwargs: Any) -> Any:
    return owner._runner.lines(fn(owner, *args, **kwargs))


class Lines:
    """The lines of a followed stream (``Client``): an iterator, and a context manager whose end (or
    ``close()``) closes the stream and gives its connection back, also after a ``break``."""

    def __init__(self, lines: Generator[str, None, None]) -> None:
        self._lines = lines

    def __iter__(self) -> Lines:
        return self

    def __next__(self) -> str:
        return next(self._lines)

    def close(self) -> None:
        self._lines.close()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLines:
    """The lines of a followed stream (``AsyncClient``): an async iterator, and an async context manager
    whose end (or ``aclose()``) closes the stream. An ``async for`` left by ``break`` does not close it by
    itself (an async generator is only finalized later): use ``async with`` or ``contextlib.aclosing``."""

    def __init__(self, lines: AsyncGenerator[str, None]) -> None:
        self._lines = lines

    def __aiter__(self) -> AsyncLines:
        return self

    async def __anext__(self) -> str:
        return await self._lines.__anext__()

    async def aclose(self) -> None:
        await self._lines.aclose()

    async def __aenter__(self) -> AsyncLines:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class op(Generic[P, T]):  # noqa: N801  (used as a decorator)
    """A call written once as steps: on a ``Bound[Sync]`` it answers ``T``; on a ``Bound[Async]``, a
    coroutine of ``T``."""

    def __init__(self, fn: Callable[Concatenate[Any, P], Steps[T]]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> op[P, T]: ...
    @overload
    def __get__(self, obj: Bound[Sync], owner: type | None = None) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: Bound[Async], owner: type | None = None) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, obj: Bound[Any] | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return functools.update_wrapper(functools.partial(_run, self.fn, obj), self.fn)


class stream(Generic[P]):  # noqa: N801  (used as a decorator)
    """A call whose steps end in the ``Call`` of a text stream: on a ``Bound[Sync]`` it answers its ``Lines``
    (``close()`` or a ``with`` block ends the stream), on a ``Bound[Async]`` its ``AsyncLines`` (``aclose()``,
    ``async with``)."""

    def __init__(self, fn: Callable[Concatenate[Any, P], Steps[Call]]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> stream[P]: ...
    @overload
    def __get__(self, obj: Bound[Sync], owner: type | None = None) -> Callable[P, Lines]: ...
    @overload
    def __get__(self, obj: Bound[Async], owner: type | None = None) -> Callable[P, AsyncLines]: ...
    def __get__(self, obj: Bound[Any] | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return functools.update_wrapper(functools.partial(_lines, self.fn, obj), self.fn)
