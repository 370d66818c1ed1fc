"""The runners that carry out an SDK call's steps (``mmanager.client.calls``): ``SyncRunner`` on
``httpx.Client``, ``AsyncRunner`` on ``httpx.AsyncClient``.

Invariant: both turn an answer into a result, or into an ``ApiError``, in the same functions (``_request``,
``_result``), so the two clients cannot disagree; an ``ApiError`` is thrown into the call's steps, which may
catch it (a name looked up) or let it through.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from mmanager.client.calls import Call, Notify, Pause, Step, Steps, T
from mmanager.client.errors import HUB_UNREACHABLE, ApiError, from_answer


def _request(client: httpx.Client | httpx.AsyncClient, hub: str, token: str | None, call: Call,
             streamed: bool = False) -> httpx.Request:
    url = (call.base.rstrip("/") + call.path) if call.base else hub + call.path
    headers = {"Accept": "text/plain" if call.read == "text" else "application/json"}
    bearer = call.token or (token if call.hub_token else None)
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    params = {k: _param(v) for k, v in (call.params or {}).items() if v is not None}
    extensions = {"timeout": httpx.Timeout(client.timeout.connect, read=None).as_dict()} if streamed or call.waits else None
    return client.build_request(call.method, url, params=params, json=call.json, headers=headers,
                                extensions=extensions)


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _unreachable(call: Call, hub: str, exc: httpx.TransportError) -> ApiError:
    where = call.base or hub
    what = "the hub" if call.base is None else "the service"
    return ApiError(0, HUB_UNREACHABLE if call.base is None else "SERVICE_UNREACHABLE",
                    f"cannot reach {what} at {where}: {type(exc).__name__}: {exc}".rstrip(": "))


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    return from_answer(response.status_code, body, response.text)


def _result(call: Call, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error(response)
    if call.read == "none" or response.status_code == 204:
        return None
    if call.read == "text":
        return response.text
    try:
        return response.json()
    except ValueError:
        raise ApiError(response.status_code, "BAD_ANSWER",
                       f"{call.method} {call.path} answered something that is not JSON") from None


class SyncRunner:
    def __init__(self, url: str, token: str | None, timeout: float,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url, self.token = url, token
        self.http = httpx.Client(timeout=timeout, transport=transport)
        # What calls look up once per client (who the caller is).
        self.cache: dict[str, Any] = {}

    def send(self, call: Call) -> Any:
        try:
            response = self.http.send(_request(self.http, self.url, self.token, call))
        except httpx.TransportError as exc:
            raise _unreachable(call, self.url, exc) from None
        return _result(call, response)

    def run(self, steps: Steps[T]) -> T:
        value: Any = None
        error: ApiError | None = None
        while True:
            try:
                step: Step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            if isinstance(step, Pause):
                time.sleep(step.seconds)
            elif isinstance(step, Notify):
                step.callback(step.value)
            else:
                try:
                    value = self.send(step)
                except ApiError as exc:
                    error = exc

    def lines(self, steps: Steps[Call]) -> Generator[str, None, None]:
        call = self.run(steps)
        request = _request(self.http, self.url, self.token, call, streamed=True)
        try:
            response = self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _unreachable(call, self.url, exc) from None
        try:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            try:
                yield from response.iter_lines()
            except httpx.TransportError as exc:
                raise _unreachable(call, self.url, exc) from None
        finally:
            response.close()

    def close(self) -> None:
        self.http.close()


class AsyncRunner:
    def __init__(self, url: str, token: str | None, timeout: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url, self.token = url, token
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport)
        self.cache: dict[str, Any] = {}

    async def send(self, call: Call) -> Any:
        try:
            response = await self.http.send(_request(self.http, self.url, self.token, call))
        except httpx.TransportError as exc:
            raise _unreachable(call, self.url, exc) from None
        return _result(call, response)

    async def run(self, steps: Steps[T]) -> T:
        value: Any = None
        error: ApiError | None = None
        while True:
            try:
                step: Step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Notify):
                answered = step.callback(step.value)
                if inspect.isawaitable(answered):
                    await answered
            else:
                try:
                    value = await self.send(step)
                except ApiError as exc:
                    error = exc

    async def lines(self, steps: Steps[Call]) -> AsyncGenerator[str, None]:
        call = await self.run(steps)
        request = _request(self.http, self.url, self.token, call, streamed=True)
        try:
            response = await self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _unreachable(call, self.url, exc) from None
        try:
            if response.status_code >= 400:
                await response.aread()
                raise _error(response)
            try:
                async for line in response.aiter_lines():
                    yield line
            except httpx.TransportError as exc:
                raise _unreachable(call, self.url, exc) from None
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.http.aclose()
