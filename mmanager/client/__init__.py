"""The Python SDK of the hub (docs/SDK.md): ``Client`` and ``AsyncClient``, one implementation of each call
(``mmanager.client.api``) run by a sync or an async runner, typed with the hub's own wire models.

Invariant: every failure reaches the caller as an ``ApiError`` carrying the hub's code and message.
"""

from __future__ import annotations

from types import TracebackType

import httpx

from hub.schemas import MeOut as Me
from mmanager.client import config
from mmanager.client.api import Api, Service
from mmanager.client.calls import Async, Sync
from mmanager.client.errors import HUB_UNREACHABLE, ApiError
from mmanager.client.transport import AsyncRunner, SyncRunner

__all__ = ["HUB_UNREACHABLE", "ApiError", "AsyncClient", "AsyncService", "Client", "Me", "Service", "config"]

AsyncService = Service[Async]


class Client(Api[Sync]):
    """The hub, called synchronously. ``url``/``token`` None: ``MMANAGER_HUB_URL`` / ``MMANAGER_TOKEN``,
    else the login profile (``profile``, ``MMANAGER_PROFILE`` or the configuration's current one)."""

    def __init__(self, url: str | None = None, token: str | None = None, profile: str | None = None,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        url, token = config.resolve(url, token, profile)
        self._runner: SyncRunner = SyncRunner(url, token, timeout, transport)
        super().__init__(self._runner)

    @property
    def url(self) -> str:
        return self._runner.url

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(Api[Async]):
    """``Client``'s calls, awaited (``follow_logs``: an async iterator)."""

    def __init__(self, url: str | None = None, token: str | None = None, profile: str | None = None,
                 timeout: float = 60.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        url, token = config.resolve(url, token, profile)
        self._runner: AsyncRunner = AsyncRunner(url, token, timeout, transport)
        super().__init__(self._runner)

    @property
    def url(self) -> str:
        return self._runner.url

    async def aclose(self) -> None:
        await self._runner.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


