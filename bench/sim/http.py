"""A minimal HTTP/1.1 server and keep-alive client on bare asyncio, for the simulator.

Why not uvicorn and httpx: without httptools, uvicorn parses with h11, and a
FastAPI request, like an httpx call on the client side, costs several times
what this protocol does. Ten thousand simulated controllers beating every two
seconds and answering the hub's placements would then need several cores of
their own, and on a small machine the simulator would measure itself instead
of the hub. What the peers send here is narrow: the hub's httpx client (bodies
with Content-Length, no pipelining) and the hub's uvicorn answers.

Both sides support keep-alive, Content-Length bodies and, on the client side,
chunked answers. A request body sent chunked is refused with 411.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# Larger request heads or bodies are refused: the hub sends nothing near these.
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
# Seconds an idle client connection is reused for: under uvicorn's keep-alive timeout (5 s).
IDLE_REUSE = 3.0
_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    # The (address, port) the peer connected to: which simulated controller it meant.
    local: tuple[str, int]


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(data, separators=(",", ":")).encode(), headers=headers or {})


# None: drop the connection without an answer (a host that is gone).
Handler = Callable[[Request], Awaitable[Response | None]]


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler, connections: set[_ServerProtocol]) -> None:
        self.handler = handler
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.local: tuple[str, int] = ("", 0)
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sockname = transport.get_extra_info("sockname")
        self.local = (sockname[0], sockname[1])
        # Listening on 0.0.0.0 is what lets one socket answer every 127.x.y.z; anyone else is turned away.
        if not self.local[0].startswith("127."):
            transport.close()
            return
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._fail(431)
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, _ = head[0].split(" ", 2)
        except ValueError:
            self._fail(400)
            return
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._fail(411)
            return
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._fail(400)
            return
        if length > MAX_BODY:
            self._fail(413)
            return
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        parts = urlsplit(target)
        request = Request(method, parts.path, dict(parse_qsl(parts.query)), headers, body, self.local)
        self.busy = True
        asyncio.get_running_loop().create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        try:
            response = await self.handler(request)
        except Exception as exc:  # a bug in a handler: answer like a server would, keep serving
            response = Response.json({"error": {"code": "INTERNAL_ERROR", "message": repr(exc)}}, 500)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if response is None:
            transport.abort()
            return
        extra = "".join(f"{k}: {v}\r\n" for k, v in response.headers.items())
        transport.write(
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}\r\n"
            f"content-type: {response.content_type}\r\ncontent-length: {len(response.body)}\r\n{extra}\r\n".encode()
            + response.body
        )
        if request.headers.get("connection", "").lower() == "close":
            transport.close()
            return
        self.busy = False
        if self.buffer:
            self._next()

    def _fail(self, status: int) -> None:
        assert self.transport is not None
        self.transport.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-length: 0\r\n\r\n".encode())
        self.transport.close()


class Server:
    """One listening socket; ``handler`` gets every request with the local address it arrived on."""

    def __init__(self, handler: Handler, host: str = "0.0.0.0", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerProtocol] = set()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerProtocol(self.handler, self._connections), self.host, self.port, backlog=4096,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def drop(self, local_address: str) -> None:
        """Close every connection made to ``local_address`` (a controller that dies loses its sockets)."""
        for protocol in list(self._connections):
            if protocol.local[0] == local_address and protocol.transport is not None:
                protocol.transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for protocol in list(self._connections):
                if protocol.transport is not None:
                    protocol.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None


class ClientError(Exception):
    """No answer: the connection failed, closed or timed out."""


class Client:
    """Keep-alive connections to one HTTP server, at most ``connections`` at a time."""

    def __init__(self, base_url: str, connections: int = 64) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http":
            raise ValueError("the simulator speaks plain http to the hub")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = parts.netloc
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float = 10.0) -> tuple[int, bytes, dict[str, str]]:
        """The answer's status, body and headers (names in lower case)."""
        # The timeout covers waiting for a connection too, as a real controller's covers connecting:
        # a beat queued behind a saturated hub fails like one that got no answer.
        try:
            async with asyncio.timeout(timeout):
                return await self._request(method, path, body, headers, timeout)
        except TimeoutError:
            raise ClientError(f"no answer within {timeout:g} s") from None

    async def _request(self, method: str, path: str, body: bytes, headers: dict[str, str] | None,
                       timeout: float) -> tuple[int, bytes, dict[str, str]]:
        async with self._slots:
            loop = asyncio.get_running_loop()
            # Connections idle for longer than the server keeps them (uvicorn: 5 s) are not reused.
            while self._idle and loop.time() - self._idle[-1][2] > IDLE_REUSE:
                self._idle.pop()[1].close()
            conn = self._idle.pop()[:2] if self._idle else None
            try:
                if conn is not None:
                    try:
                        return await self._over(conn, method, path, body, headers, timeout)
                    except (OSError, asyncio.IncompleteReadError):
                        pass  # the server closed it meanwhile: once more on a new connection
                conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
                return await self._over(conn, method, path, body, headers, timeout)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                raise ClientError(f"{type(exc).__name__}: {exc}") from None

    async def _over(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], method: str, path: str,
                    body: bytes, headers: dict[str, str] | None, timeout: float) -> tuple[int, bytes, dict[str, str]]:
        try:
            status, answer, fields = await asyncio.wait_for(self._exchange(conn, method, path, body, headers), timeout)
        except BaseException:
            conn[1].close()
            raise
        if fields.get("connection", "").lower() != "close":
            self._idle.append((*conn, asyncio.get_running_loop().time()))
        else:
            conn[1].close()
        return status, answer, fields

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], method: str, path: str,
                        body: bytes, headers: dict[str, str] | None) -> tuple[int, bytes, dict[str, str]]:
        reader, writer = conn
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"{method} {path} HTTP/1.1\r\nhost: {self.host_header}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n".encode() + body
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            chunks = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunks.append(await reader.readexactly(size + 2))
            await reader.readuntil(b"\r\n")
            answer = b"".join(c[:-2] for c in chunks)
        else:
            answer = await reader.readexactly(int(fields.get("content-length", "0")))
        return status, answer, fields

    async def aclose(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()
