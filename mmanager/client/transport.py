"""The runners that carry out an SDK call's steps (``mmanager.client.calls``): ``SyncRunner`` on
``httpx.Client``, ``AsyncRunner`` on ``httpx.AsyncClient``.

Invariant: both turn an answer into a result, or into an ``ApiError``, in the same functions (``_request``,
``_sending``, ``_result``, ``_streaming``, ``_resume``; a URL httpx refuses is ``INVALID_URL``), so the two
clients cannot disagree: each runner keeps only what differs between blocking and awaiting. A download
(``Call.download``) is written to a temporary file beside its path and renamed only once whole and checked
(``_Sink``): an interrupted or corrupt download never leaves a file at its path. An ``ApiError``
is thrown into the call's steps, which may catch it (a name looked up) or let it through. Every read has a
finite timeout: a hub host that vanishes ends a call, a wait and a followed stream with an error instead of
holding them forever. An upload's file is read a chunk at a time as it is sent, and closed once the call is
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import os
import stat
import tempfile
import time
from collections.abc import AsyncGenerator, Generator, Iterator
from typing import Any, BinaryIO

import httpx

from mmanager.client.calls import AsyncLines, Call, Download, Lines, Notify, Pause, Step, Steps, T, Upload
from mmanager.client.errors import HUB_UNREACHABLE, ApiError, from_answer

# Seconds an answer to a call the hub waits on (``?wait=true``) may take: past the longest of the hub's own
# bounded waits on one operation (a create's model sync, MMANAGER_MODEL_SYNC_TIMEOUT, then its pull and its
# health check), so the hub always answers first while it is there.
WAIT_READ = 3600.0
# Seconds a followed stream may stay silent before it is opened again from its end (``Call.resume``): the
# hub sends nothing while a service logs nothing, and a host that vanished sends nothing either; opening it
# again tells the two apart (a hub that is gone answers HUB_UNREACHABLE).
FOLLOW_QUIET = 300.0
# Bytes of an uploaded file read and sent at a time (``Call.upload``).
UPLOAD_CHUNK = 1024**2


def _request(client: httpx.Client | httpx.AsyncClient, hub: str, token: str | None, call: Call,
             streamed: bool = False, content: Any = None, size: int | None = None) -> httpx.Request:
    url = (call.base.rstrip("/") + call.path) if call.base else hub + call.path
    headers = {"Accept": "*/*" if call.download else "text/plain" if call.read == "text" else "application/json"}
    if size is not None:
        # Declared up front: the hub refuses a file over its limits before a byte of it is sent.
        headers |= {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    bearer = call.token or (token if call.hub_token else None)
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    params = {k: _param(v) for k, v in (call.params or {}).items() if v is not None}
    read = FOLLOW_QUIET if streamed else WAIT_READ if call.waits else None
    extensions = {"timeout": httpx.Timeout(client.timeout.connect, read=read).as_dict()} if read else None
    return client.build_request(call.method, url, params=params, json=call.json, content=content,
                                headers=headers, extensions=extensions)


def _open(upload: Upload) -> tuple[BinaryIO, int]:
    """The file to upload, open, and its size; one that is not a readable regular file is ``INVALID_FILE``."""
    try:
        if not stat.S_ISREG(os.stat(upload.path).st_mode):  # before open: a FIFO would block it
            raise ApiError(0, "INVALID_FILE", f"{upload.path}: not a regular file")
        handle = open(upload.path, "rb")  # noqa: SIM115  (closed by the runner's send, once answered)
    except OSError as exc:
        raise ApiError(0, "INVALID_FILE", f"{upload.path}: {exc.strerror or exc}") from None
    return handle, os.fstat(handle.fileno()).st_size


def _chunks(handle: BinaryIO, size: int, upload: Upload) -> Generator[bytes, None, None]:
    """The file's first ``size`` bytes (what ``Content-Length`` declared), a chunk at a time."""
    done = 0
    if upload.progress is not None:
        upload.progress(0, size)
    while done < size and (chunk := handle.read(min(UPLOAD_CHUNK, size - done))):
        yield chunk
        done += len(chunk)
        if upload.progress is not None:
            upload.progress(done, size)


async def _achunks(handle: BinaryIO, size: int, upload: Upload) -> AsyncGenerator[bytes, None]:
    """``_chunks`` for the async client: the file read on a thread, ``progress`` awaited when it is async."""
    async def told(done: int) -> None:
        if upload.progress is not None and inspect.isawaitable(answered := upload.progress(done, size)):
            await answered

    done = 0
    await told(0)
    while done < size and (chunk := await asyncio.to_thread(handle.read, min(UPLOAD_CHUNK, size - done))):
        yield chunk
        done += len(chunk)
        await told(done)


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _unreachable(call: Call, hub: str, exc: httpx.TransportError) -> ApiError:
    if call.waits and isinstance(exc, httpx.ReadTimeout):
        return ApiError(0, "WAIT_TIMEOUT", f"{call.method} {call.path} had no answer after {WAIT_READ:.0f} s; the "
                                           "operation may go on (see operations.list)")
    where = call.base or hub
    what = "the hub" if call.base is None else "the service"
    return ApiError(0, HUB_UNREACHABLE if call.base is None else "SERVICE_UNREACHABLE",
                    f"cannot reach {what} at {where}: {type(exc).__name__}: {exc}".rstrip(": "))


def _invalid(call: Call, hub: str, exc: httpx.InvalidURL) -> ApiError:
    """A URL httpx cannot send to (``InvalidURL`` is no ``TransportError``): the hub's, or a service's."""
    return ApiError(0, "INVALID_URL", f"{call.method} {(call.base or hub) + call.path}: not a URL: {exc}")


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    return from_answer(response.status_code, body, response.text)


def _redirected(call: Call, response: httpx.Response) -> ApiError:
    """A 3xx: a proxy or a wrong URL (http for https, a missing path), never the hub's answer to the call."""
    where = response.headers.get("location") or "nowhere"
    return ApiError(response.status_code, "REDIRECTED",
                    f"{call.method} {response.request.url} was redirected to {where}: is the hub URL right?",
                    {"location": response.headers.get("location")})


def _refused(call: Call, response: httpx.Response) -> ApiError:
    """The error a 3xx or 4xx/5xx answer stands for (its body read)."""
    return _error(response) if response.status_code >= 400 else _redirected(call, response)


def _result(call: Call, response: httpx.Response) -> Any:
    if response.status_code >= 300:
        raise _refused(call, response)
    if call.read == "none" or response.status_code == 204:
        return None
    if call.read == "text":
        return response.text
    try:
        return response.json()
    except ValueError:
        raise ApiError(response.status_code, "BAD_ANSWER",
                       f"{call.method} {call.path} answered something that is not JSON") from None


def _resumed(call: Call) -> Call:
    """A stream's call again, from its end (after a quiet spell: nothing was missed but what came while it
    was opened again)."""
    return dataclasses.replace(call, params={**(call.params or {}), **(call.resume or {})})


@contextlib.contextmanager
def _sending(call: Call, hub: str) -> Iterator[tuple[BinaryIO, int] | None]:
    """Around sending ``call``: its upload's file open (closed once answered), and httpx's errors as
    ``ApiError``."""
    opened = _open(call.upload) if call.upload is not None else None
    try:
        yield opened
    except httpx.TransportError as exc:
        raise _unreachable(call, hub, exc) from None
    except httpx.InvalidURL as exc:
        raise _invalid(call, hub, exc) from None
    finally:
        if opened:
            opened[0].close()


@contextlib.contextmanager
def _streaming(call: Call, hub: str) -> Iterator[None]:
    """Around reading a followed stream's lines: a quiet spell on a stream that can be resumed (``call.resume``)
    ends the block without an error, for the stream to be opened again from its end; a quiet spell on any
    other stream, and a lost connection, are ``ApiError``."""
    try:
        yield
    except httpx.ReadTimeout:
        if call.resume is None:
            raise _unreachable(call, hub, httpx.ReadTimeout("no line")) from None
    except httpx.TransportError as exc:
        raise _unreachable(call, hub, exc) from None


class _Sink:
    """Where a ``Download`` goes while it comes: a temporary file beside its path, hashed as it is written.
    ``finish`` checks the whole and renames it to the path; ``abandon`` removes it."""

    def __init__(self, download: Download, response: httpx.Response) -> None:
        self.download = download
        length = response.headers.get("content-length", "")
        self.total = download.size if download.size is not None else int(length) if length.isdigit() else 0
        self.done = 0
        self.hash = hashlib.sha256()
        parent = os.path.dirname(os.path.abspath(download.path))
        try:
            os.makedirs(parent, exist_ok=True)
            fd, self.temp = tempfile.mkstemp(prefix=f".{os.path.basename(download.path)}.", suffix=".part",
                                             dir=parent)
        except OSError as exc:
            raise ApiError(0, "INVALID_FILE", f"{download.path}: {exc.strerror or exc}") from None
        self.handle = os.fdopen(fd, "wb")

    def told(self) -> Any:
        """What ``progress`` answered (an awaitable, for the async runner to await), or None."""
        return None if self.download.progress is None else self.download.progress(self.done, self.total)

    def write(self, chunk: bytes) -> Any:
        self.handle.write(chunk)
        self.hash.update(chunk)
        self.done += len(chunk)
        return self.told()

    def finish(self) -> str:
        self.handle.close()
        path, expected = self.download.path, (self.download.sha256 or "").removeprefix("sha256:").lower()
        if self.download.size is not None and self.done != self.download.size:
            raise ApiError(0, "DOWNLOAD_INCOMPLETE", f"{path}: got {self.done} bytes of {self.download.size}")
        if expected and self.hash.hexdigest() != expected:
            raise ApiError(0, "DIGEST_MISMATCH", f"{path}: the bytes received hash to sha256:"
                                                 f"{self.hash.hexdigest()}, not sha256:{expected}")
        os.replace(self.temp, path)
        return path

    def abandon(self) -> None:
        self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.temp)


@contextlib.contextmanager
def _saving(call: Call, hub: str, response: httpx.Response) -> Iterator[_Sink]:
    """Around writing a download's body: its ``_Sink``, removed on any failure; httpx's and the file's
    errors as ``ApiError``."""
    assert call.download is not None
    sink = _Sink(call.download, response)
    try:
        yield sink
    except httpx.TransportError as exc:
        sink.abandon()
        raise _unreachable(call, hub, exc) from None
    except OSError as exc:
        sink.abandon()
        raise ApiError(0, "INVALID_FILE", f"{call.download.path}: {exc.strerror or exc}") from None
    except BaseException:
        sink.abandon()
        raise


@dataclasses.dataclass(frozen=True)
class _Returned:
    value: Any


def _resume(steps: Steps[T], answer: Any) -> Step | _Returned:
    """The call's next step, given the last one's answer (an ``ApiError`` is thrown into the steps), or what
    the steps returned."""
    try:
        return steps.throw(answer) if isinstance(answer, ApiError) else steps.send(answer)
    except StopIteration as stop:
        return _Returned(stop.value)


class SyncRunner:
    def __init__(self, url: str, token: str | None, timeout: float,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url, self.token = url, token
        self.http = httpx.Client(timeout=timeout, transport=transport)
        # What calls look up once per client (who the caller is).
        self.cache: dict[str, Any] = {}

    def send(self, call: Call) -> Any:
        if call.download is not None:
            return self._download(call)
        with _sending(call, self.url) as opened:
            content = _chunks(*opened, call.upload) if opened and call.upload else None
            response = self.http.send(_request(self.http, self.url, self.token, call, content=content,
                                               size=opened[1] if opened else None))
        return _result(call, response)

    def _download(self, call: Call) -> str:
        with _sending(call, self.url):
            response = self.http.send(_request(self.http, self.url, self.token, call), stream=True)
        try:
            if response.status_code >= 300:
                response.read()
                raise _refused(call, response)
            with _saving(call, self.url, response) as sink:
                sink.told()
                for chunk in response.iter_bytes(UPLOAD_CHUNK):
                    sink.write(chunk)
                return sink.finish()
        finally:
            response.close()

    def run(self, steps: Steps[T]) -> T:
        answer: Any = None
        while not isinstance(step := _resume(steps, answer), _Returned):
            answer = self._take(step)
        return step.value

    def _take(self, step: Step) -> Any:
        """What carrying out ``step`` answers: a call's result or its ``ApiError``."""
        if isinstance(step, Pause):
            time.sleep(step.seconds)
        elif isinstance(step, Notify):
            step.callback(step.value)
        else:
            try:
                return self.send(step)
            except ApiError as exc:
                return exc
        return None

    def lines(self, steps: Steps[Call]) -> Lines:
        return Lines(self._lines(steps))

    def _lines(self, steps: Steps[Call]) -> Generator[str, None, None]:
        call = self.run(steps)
        while True:
            with _sending(call, self.url):
                response = self.http.send(_request(self.http, self.url, self.token, call, streamed=True),
                                          stream=True)
            try:
                if response.status_code >= 300:
                    response.read()
                    raise _refused(call, response)
                with _streaming(call, self.url):
                    yield from response.iter_lines()
                    return
            finally:
                response.close()
            call = _resumed(call)

    def close(self) -> None:
        self.http.close()


class AsyncRunner:
    def __init__(self, url: str, token: str | None, timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url, self.token = url, token
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport)
        self.cache: dict[str, Any] = {}

    async def send(self, call: Call) -> Any:
        if call.download is not None:
            return await self._download(call)
        with _sending(call, self.url) as opened:
            content = _achunks(*opened, call.upload) if opened and call.upload else None
            response = await self.http.send(_request(self.http, self.url, self.token, call, content=content,
                                                     size=opened[1] if opened else None))
        return _result(call, response)

    async def _download(self, call: Call) -> str:
        with _sending(call, self.url):
            response = await self.http.send(_request(self.http, self.url, self.token, call), stream=True)
        try:
            if response.status_code >= 300:
                await response.aread()
                raise _refused(call, response)
            with _saving(call, self.url, response) as sink:
                if inspect.isawaitable(told := sink.told()):
                    await told
                async for chunk in response.aiter_bytes(UPLOAD_CHUNK):
                    # The file is written on the loop: a chunk's write is short beside its wait on the network.
                    if inspect.isawaitable(told := sink.write(chunk)):
                        await told
                return sink.finish()
        finally:
            await response.aclose()

    async def run(self, steps: Steps[T]) -> T:
        answer: Any = None
        while not isinstance(step := _resume(steps, answer), _Returned):
            answer = await self._take(step)
        return step.value

    async def _take(self, step: Step) -> Any:
        """``SyncRunner._take``, awaited; a ``Notify`` callback's answer awaited when it is awaitable."""
        if isinstance(step, Pause):
            await asyncio.sleep(step.seconds)
        elif isinstance(step, Notify):
            if inspect.isawaitable(answered := step.callback(step.value)):
                await answered
        else:
            try:
                return await self.send(step)
            except ApiError as exc:
                return exc
        return None

    def lines(self, steps: Steps[Call]) -> AsyncLines:
        return AsyncLines(self._lines(steps))

    async def _lines(self, steps: Steps[Call]) -> AsyncGenerator[str, None]:
        call = await self.run(steps)
        while True:
            with _sending(call, self.url):
                response = await self.http.send(_request(self.http, self.url, self.token, call, streamed=True),
                                                stream=True)
            try:
                if response.status_code >= 300:
                    await response.aread()
                    raise _refused(call, response)
                with _streaming(call, self.url):
                    async for line in response.aiter_lines():
                        yield line
                    return
            finally:
                await response.aclose()
            call = _resumed(call)

    async def close(self) -> None:
        await self.http.aclose()
