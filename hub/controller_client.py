"""The hub's one HTTP client to controllers.

One ``httpx.AsyncClient`` serves every controller, with a small connection pool
per controller (``PoolPerController``); the key is chosen per call from the
hub's settings, never from a table. Followed
logs, which hold their connection as long as their client wants, use a second
client of their own (``MMANAGER_MAX_LOG_STREAMS`` connections), so they can
never take the connections the lifecycle calls need. Only calls
that are safe to repeat are retried: reads, start/stop/restart/delete (they
converge on the same state) and creates carrying ``(service_id, epoch)``, which
the controller makes idempotent. Retries cover transport errors and 502/503/504.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from hub.config import HubSettings
from hub.errors import ControllerRejected, ControllerTimedOut, ControllerUnavailable, HubError
from hub.metrics import HubMetrics
from mmanager.logs import HEADER as REQUEST_ID_HEADER
from mmanager.logs import current_request_id
from mmanager.streams import ClosingStream, newest_text
from mmanager.wire import (
    ActionResult,
    ContainerCreate,
    ContainerCreated,
    ContainerInfo,
    ContainerList,
    ControllerHealth,
    ImagePullProgress,
    JobOutputs,
    JobRun,
    JobRunInfo,
    JobRunList,
    ModelsSynced,
    ModelSync,
    RegistryAuth,
)

RETRY_STATUSES = {502, 503, 504}


class _Retryable(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Pool:
    __slots__ = ("transport", "users")

    def __init__(self, transport: httpx.AsyncHTTPTransport) -> None:
        self.transport = transport
        self.users = 0  # calls whose response is not closed yet


class _Released(httpx.AsyncByteStream):
    """A response's body that gives its pool back (``_Pool.users``) once closed."""

    def __init__(self, stream: httpx.AsyncByteStream, pool: _Pool) -> None:
        self._stream = stream
        self._pool: _Pool | None = pool

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._pool is not None:
                self._pool.users -= 1
                self._pool = None


class PoolPerController(httpx.AsyncBaseTransport):
    """A connection pool for each controller (each URL origin); the least recently used ones beyond
    ``max_pools`` are closed once no call uses them.

    httpcore's pool looks at every one of its connections on each request and at each response's end
    (closed? expired? has the server hung up, one ``poll`` per idle connection?). One pool for the whole
    fleet makes that scan grow with the fleet; a pool per controller holds the few connections that
    controller's calls need.
    """

    def __init__(self, verify: ssl.SSLContext, max_pools: int = 256, per_controller: int = 200,
                 keepalive: int = 4) -> None:
        self._verify = verify
        self._max_pools = max_pools
        self._limits = httpx.Limits(max_connections=per_controller, max_keepalive_connections=keepalive)
        self._pools: OrderedDict[tuple[bytes, bytes, int | None], _Pool] = OrderedDict()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = (request.url.raw_scheme, request.url.raw_host, request.url.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(httpx.AsyncHTTPTransport(verify=self._verify, limits=self._limits))
        else:
            self._pools.move_to_end(key)
        pool.users += 1
        try:
            if len(self._pools) > self._max_pools:
                await self._trim()
            response = await pool.transport.handle_async_request(request)
        except BaseException:
            pool.users -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, pool)
        return response

    async def _trim(self) -> None:
        """Close the least recently used pools that no call holds, down to ``max_pools``."""
        while len(self._pools) > self._max_pools:
            key = next((key for key, pool in self._pools.items() if pool.users == 0), None)
            if key is None:
                return
            await self._pools.pop(key).transport.aclose()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.transport.aclose()


class ControllerClient:
    def __init__(self, settings: HubSettings, transport: httpx.AsyncBaseTransport | None = None,
                 metrics: HubMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        # Controllers on https are verified against MMANAGER_TLS_CA (else the system store), and the hub
        # presents its own certificate for controllers that require one: one context for every pool.
        tls = settings.tls.client_context()
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.controller_timeout, connect=5.0),
            transport=transport or PoolPerController(tls),
            verify=tls,  # for the transports httpx makes itself (a proxy from the environment)
        )
        # The hub admits at most max_log_streams of them (hub.logstreams), so this pool never makes one wait.
        self.stream_http = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0),
            limits=httpx.Limits(
                max_connections=settings.max_log_streams, max_keepalive_connections=min(settings.max_log_streams, 8)
            ),
            transport=transport,
            verify=tls,
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.stream_http.aclose()

    def _headers(self, controller_id: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.settings.key_for(controller_id)}"}
        # The id of the request (or background operation) this call serves: the controller logs it too.
        request_id = current_request_id()
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        return headers

    async def _send(self, controller_id: str, base_url: str, method: str, path: str, *, call: str,
                    **kw: Any) -> httpx.Response:
        """One call, timed into ``mmanager_controller_call_duration_seconds{call}``
        (retries included: what the caller waited), whatever its outcome."""
        started = time.monotonic()
        try:
            return await self._exchange(controller_id, base_url, method, path, **kw)
        finally:
            self._timed(controller_id, call, started)

    def _timed(self, controller_id: str, call: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.controller_calls.labels(call).observe(time.monotonic() - started)

    async def _exchange(
        self,
        controller_id: str,
        base_url: str,
        method: str,
        path: str,
        *,
        idempotent: bool,
        timeout: float | None = None,
        timeout_code: str | None = None,
        **kw: Any,
    ) -> httpx.Response:
        """``timeout_code``: a call whose answer does not come in time fails with ``ControllerTimedOut`` (504)
        and this code, not as an unreachable controller."""
        url = base_url.rstrip("/") + path
        attempts = 3 if idempotent else 1

        async def once() -> httpx.Response:
            try:
                response = await self.http.request(
                    method, url, headers=self._headers(controller_id), timeout=timeout or httpx.USE_CLIENT_DEFAULT, **kw
                )
            except httpx.TransportError as exc:
                raise _Retryable(exc) from exc
            except httpx.InvalidURL as exc:
                # A registered URL httpx cannot use (a host IDNA refuses): that controller cannot be reached.
                raise ControllerUnavailable(f"controller {controller_id} has an unusable URL: {exc}",
                                            {"controller_id": controller_id}) from None
            if response.status_code in RETRY_STATUSES:
                raise _Retryable(_error_from(controller_id, response))
            return response

        try:
            try:
                # The first attempt outside tenacity: its machinery costs more than most calls do.
                response = await once()
            except _Retryable:
                if attempts == 1:
                    raise
                # Then 0.2 s, and twice as long before each further attempt (at most 2 s).
                await asyncio.sleep(0.2)
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(attempts - 1),
                    wait=wait_exponential(multiplier=0.4, max=2),
                    retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                    reraise=True,
                ):
                    with attempt:
                        response = await once()
        except _Retryable as exc:
            cause = exc.cause
            if isinstance(cause, HubError):
                raise cause from None
            if timeout_code is not None and isinstance(cause, httpx.ReadTimeout):
                raise ControllerTimedOut(
                    f"controller {controller_id} did not answer within {timeout:g} s",
                    {"controller_id": controller_id, "timeout": timeout}, code=timeout_code) from None
            raise ControllerUnavailable(
                f"controller {controller_id} is unreachable: {type(cause).__name__}: {cause}",
                {"controller_id": controller_id},
            ) from None
        if response.status_code >= 400:
            raise _error_from(controller_id, response)
        return response

    async def health(self, controller_id: str, url: str, timeout: float = 3.0) -> ControllerHealth:
        response = await self._send(controller_id, url, "GET", "/health", call="health", idempotent=False,
                                   timeout=timeout)
        return ControllerHealth.model_validate(response.json())

    async def refuses(self, url: str, timeout: float) -> bool:
        """Whether the controller at ``url`` refuses connections (nothing listens there: its process is gone),
        as opposed to answering (whatever it answers), timing out or failing some other way."""
        try:
            await self.http.get(url.rstrip("/") + "/health", timeout=timeout)
        except httpx.ConnectError as exc:
            return refused(exc)
        except httpx.HTTPError:
            return False
        return False

    async def create(self, controller_id: str, url: str, config: ContainerCreate) -> ContainerCreated:
        """Create and start; a controller that has not yet fenced its stale copies since it came
        back (503 CONTROLLER_NOT_SYNCED) gets until its next heartbeat or two before it counts as down."""
        deadline = time.monotonic() + 2 * self.settings.heartbeat_interval + 1
        while True:
            try:
                return await self._create(controller_id, url, config)
            except ControllerUnavailable as exc:
                if exc.code != "CONTROLLER_NOT_SYNCED" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.25)

    async def _create(self, controller_id: str, url: str, config: ContainerCreate) -> ContainerCreated:
        response = await self._send(
            controller_id,
            url,
            "POST",
            "/containers/",
            call="create",
            idempotent=config.service_id is not None and config.epoch is not None,
            timeout=self.settings.controller_create_timeout,
            json=config.model_dump(mode="json", exclude_none=True),
        )
        return ContainerCreated.model_validate(response.json())

    async def images(self, controller_id: str, url: str) -> list[dict[str, Any]]:
        """The images on the controller's engine, as it lists them (``GET /images``)."""
        response = await self._send(controller_id, url, "GET", "/images", call="images", idempotent=True)
        images = response.json().get("images")
        return images if isinstance(images, list) else []

    async def pull_image(self, controller_id: str, url: str, image: str,
                         auth: RegistryAuth | None = None) -> dict[str, Any]:
        """Have the controller pull ``image`` (logged in with ``auth``); the image as it then has it. Asked
        once (a pull may take minutes, and a repeat would send the credentials again), waiting up to
        ``controller_pull_timeout``; no answer by then is 504 ``IMAGE_PULL_TIMEOUT``."""
        body: dict[str, Any] = {"image": image}
        if auth is not None:
            body["auth"] = auth.model_dump(mode="json")
        timeout = self.settings.controller_pull_timeout
        response = await self._send(controller_id, url, "POST", "/images/pull", call="image_pull", idempotent=False,
                                    timeout=timeout, timeout_code="IMAGE_PULL_TIMEOUT", json=body)
        image_detail = response.json().get("image")
        return image_detail if isinstance(image_detail, dict) else {}

    async def image_pulls(self, controller_id: str, url: str, timeout: float) -> list[ImagePullProgress]:
        """The pulls of missing images the controller's creates wait for now, with their progress."""
        response = await self._send(controller_id, url, "GET", "/images/pulls", call="image_pulls", idempotent=False,
                                    timeout=timeout)
        body = response.json()
        return [ImagePullProgress.model_validate(item) for item in body] if isinstance(body, list) else []

    async def prune_images(self, controller_id: str, url: str) -> tuple[list[str], int]:
        """Have the controller remove its unused (dangling) images: their ids, and the bytes freed."""
        response = await self._send(controller_id, url, "POST", "/images/prune", call="image_prune",
                                    idempotent=True, timeout=self.settings.controller_create_timeout)
        body = response.json()
        return [str(i) for i in body.get("images_deleted") or []], int(body.get("space_reclaimed") or 0)

    async def sync_models(self, controller_id: str, url: str, digests: list[str],
                          timeout: float | None = None) -> ModelsSynced:
        """Have the controller fetch these model files into its cache now (``POST /models/sync``), ahead of a
        create there; it answers once they are cached and checked. Sent once, with its own long timeout
        (``MMANAGER_MODEL_SYNC_TIMEOUT``): a retry would only wait on the same transfer again."""
        response = await self._send(
            controller_id, url, "POST", "/models/sync", call="sync_models", idempotent=False,
            timeout=timeout or self.settings.model_sync_timeout,
            json=ModelSync(digests=digests).model_dump(mode="json"),
        )
        return ModelsSynced.model_validate(response.json())

    async def action(
        self, controller_id: str, url: str, container_id: str, action: str, epoch: int | None = None, **params: Any
    ) -> ActionResult:
        if epoch is not None:
            params["epoch"] = epoch
        method = "DELETE" if action == "delete" else "POST"
        path = f"/containers/{container_id}" if action == "delete" else f"/containers/{container_id}/{action}"
        response = await self._send(
            controller_id, url, method, path, call=action, idempotent=True,
            timeout=self.settings.controller_create_timeout, params=params
        )
        return ActionResult.model_validate(response.json())

    async def inspect(self, controller_id: str, url: str, container_id: str) -> ContainerInfo:
        response = await self._send(controller_id, url, "GET", f"/containers/{container_id}", call="inspect",
                                   idempotent=True)
        return ContainerInfo.model_validate(response.json())

    async def list_containers(self, controller_id: str, url: str) -> list[ContainerInfo]:
        response = await self._send(controller_id, url, "GET", "/containers/", call="list", idempotent=True,
                                   params={"all": "true"})
        return ContainerList.model_validate(response.json()).containers

    async def logs(self, controller_id: str, url: str, container_id: str, lines: int) -> str:
        response = await self._send(
            controller_id, url, "GET", f"/containers/{container_id}/logs", call="logs", idempotent=True,
            params={"lines": lines}
        )
        # Our controllers cut their answer already; one configured otherwise (or a GeoML-Hub one) may not.
        return newest_text(str(response.json().get("logs", "")), self.settings.max_log_bytes)

    async def follow_logs(self, controller_id: str, url: str, container_id: str, lines: int) -> ClosingStream:
        """The controller's stream; closing it closes the connection, which ends the stream there too."""
        request = self.stream_http.build_request(
            "GET",
            url.rstrip("/") + f"/containers/{container_id}/logs",
            params={"lines": lines, "follow": "true"},
            headers=self._headers(controller_id),
        )
        started = time.monotonic()
        try:
            response = await self.stream_http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ControllerUnavailable(f"controller {controller_id} is unreachable: {exc}") from exc
        finally:
            # Until the stream opens (its headers), not for as long as it is followed.
            self._timed(controller_id, "follow_logs", started)
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            error = _error_from(controller_id, response)
            if response.status_code == 429 and "retry-after" in response.headers:
                # The controller's own cap on followed logs (TOO_MANY_LOG_STREAMS): pass its hint on.
                error.headers = {"Retry-After": response.headers["retry-after"]}
            raise error

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.TransportError:
                return

        return ClosingStream(chunks(), response.aclose)

    # -- batch jobs (controller.routers.jobs; hub.services.jobs) ------------------------------------------

    async def run_job(self, controller_id: str, url: str, run: JobRun) -> JobRunInfo:
        """``POST /jobs/``: start one attempt. Repeated safely (the controller is idempotent on the attempt id);
        a controller not yet synced since it came back gets a heartbeat or two, as a create does."""
        deadline = time.monotonic() + 2 * self.settings.heartbeat_interval + 1
        while True:
            try:
                response = await self._send(controller_id, url, "POST", "/jobs/", call="job_run", idempotent=True,
                                            timeout=self.settings.controller_create_timeout,
                                            json=run.model_dump(mode="json", exclude_none=True))
                return JobRunInfo.model_validate(response.json())
            except ControllerUnavailable as exc:
                if exc.code != "CONTROLLER_NOT_SYNCED" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.25)

    async def job_runs(self, controller_id: str, url: str, since: int = 0, wait: float = 0) -> JobRunList:
        """``GET /jobs/?since=&wait=``: every attempt it holds, once its list's version passes ``since`` or after
        ``wait`` seconds (a long poll: asked once, with a timeout past the wait)."""
        params: dict[str, Any] = {"since": since}
        if wait:
            params["wait"] = wait
        response = await self._send(controller_id, url, "GET", "/jobs/", call="job_runs", idempotent=not wait,
                                    timeout=wait + self.settings.controller_timeout, params=params)
        return JobRunList.model_validate(response.json())

    async def job_run(self, controller_id: str, url: str, attempt_id: str) -> JobRunInfo:
        response = await self._send(controller_id, url, "GET", f"/jobs/{attempt_id}", call="job_run_info",
                                    idempotent=True)
        return JobRunInfo.model_validate(response.json())

    async def job_outputs(self, controller_id: str, url: str, attempt_id: str) -> JobOutputs:
        response = await self._send(controller_id, url, "GET", f"/jobs/{attempt_id}/outputs", call="job_outputs",
                                    idempotent=True)
        return JobOutputs.model_validate(response.json())

    async def job_output(self, controller_id: str, url: str, attempt_id: str, path: str) -> ClosingStream:
        """One output file's bytes as they come (the caller closes the stream)."""
        # Quoted: a name may hold '?', '#' or '%' (the controller's route decodes it back).
        return await self._stream(self.http, controller_id, url,
                                  f"/jobs/{attempt_id}/outputs/{quote(path, safe='/')}", {}, "job_output")

    async def job_logs(self, controller_id: str, url: str, attempt_id: str, *, follow: bool = False,
                       lines: int | None = None) -> ClosingStream:
        """The attempt's log: Docker's while it runs (followed: from the logs' own pool, as services' are), the
        controller's kept file after."""
        params: dict[str, Any] = {}
        if follow:
            params["follow"] = "true"
        if lines is not None:
            params["lines"] = lines
        return await self._stream(self.stream_http if follow else self.http, controller_id, url,
                                  f"/jobs/{attempt_id}/logs", params, "job_logs")

    async def cancel_job(self, controller_id: str, url: str, attempt_id: str) -> JobRunInfo:
        response = await self._send(controller_id, url, "POST", f"/jobs/{attempt_id}/cancel", call="job_cancel",
                                    idempotent=True, timeout=self.settings.controller_create_timeout)
        return JobRunInfo.model_validate(response.json())

    async def delete_job(self, controller_id: str, url: str, attempt_id: str) -> None:
        """Remove the attempt's container and what the controller kept of it; one it no longer holds is gone
        already."""
        try:
            await self._send(controller_id, url, "DELETE", f"/jobs/{attempt_id}", call="job_delete", idempotent=True,
                             timeout=self.settings.controller_create_timeout)
        except ControllerRejected as exc:
            if exc.status_code != 404:
                raise

    async def _stream(self, http: httpx.AsyncClient, controller_id: str, url: str, path: str,
                      params: dict[str, Any], call: str) -> ClosingStream:
        request = http.build_request("GET", url.rstrip("/") + path, params=params,
                                     headers=self._headers(controller_id))
        started = time.monotonic()
        try:
            response = await http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ControllerUnavailable(f"controller {controller_id} is unreachable: {exc}",
                                        {"controller_id": controller_id}) from exc
        finally:
            self._timed(controller_id, call, started)
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise _error_from(controller_id, response)

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in response.aiter_bytes():
                yield chunk

        return ClosingStream(chunks(), response.aclose)


# A controller's refusals of a create whose model files it could not sync (controller.model_cache).
MODEL_SYNC_CODES = frozenset({"MODEL_SYNC_FAILED", "MODEL_CHECKSUM_MISMATCH", "MODEL_CACHE_FULL"})


def refused(exc: BaseException) -> bool:
    """Whether a failed connection was refused at every address tried (what ``exc`` was caused by)."""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return False
        if isinstance(current, ConnectionRefusedError):
            return True
        if isinstance(current, BaseExceptionGroup):
            return all(refused(inner) for inner in current.exceptions)
        current = current.__cause__ or current.__context__
    return False


def _error_from(controller_id: str, response: httpx.Response) -> HubError:
    """Turn a controller's error answer into ours, keeping its code."""
    code, message, details = "CONTROLLER_ERROR", response.text[:500], None
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
            details = error.get("details")
        elif isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
    except ValueError:
        pass
    message = f"controller {controller_id}: {message}"
    if response.status_code == 401 or (response.status_code == 403 and code != "SPEC_FORBIDDEN"):
        # The hub's key was refused: an operator's problem, not the caller's credentials.
        # (SPEC_FORBIDDEN is the controller's spec policy refusing the spec: the caller's, passed on.)
        return ControllerUnavailable(message, details, code="CONTROLLER_AUTH_FAILED")
    if code == "IMAGE_PULL_FAILED":
        # The service's image could not be had (the registry lacks it, refuses it, or cannot be reached):
        # a refusal about the caller's spec whatever the controller's status, never the controller being
        # down. Deployer.deploy tries the next eligible controller on it.
        return ControllerRejected(message, details, code=code, status_code=422)
    if code in MODEL_SYNC_CODES:
        # The controller could not fetch or check a model file: not the controller being down (it answered),
        # and Deployer.deploy tries the next eligible controller on it, as on a failed pull.
        return ControllerRejected(message, details, code=code, status_code=507 if code == "MODEL_CACHE_FULL" else 502)
    if response.status_code >= 500:
        return ControllerUnavailable(message, details, code=code if code != "CONTROLLER_ERROR" else None)
    # A missing image is the caller's bad input, whatever status the controller chose for it.
    status = 422 if code == "IMAGE_NOT_FOUND" else response.status_code
    return ControllerRejected(message, details, code=code, status_code=status)
