"""The SDK's calls, each written once as steps (``mmanager.client.calls``) and typed with the hub's own wire
models (``hub.schemas``): the namespaces ``services``, ``controllers``, ``operations``, ``audit``,
``alerts``, ``models``, ``model_files`` and ``images`` (``services.keys``: a service's gateway keys), the
client's own ``me`` and ``deploy``, and the ``Service`` handle; ``jobs``, ``artifacts`` and ``pipelines``
are ``mmanager.client.jobs``', ``users`` and ``tokens`` ``mmanager.client.users``'.

Invariant: a call that starts a long operation and waits ends where the hub's own ``?wait=true`` ends (a
create of a service with a probe: at its verdict). Without ``progress`` it is that call; with ``progress``
it is sent with ``?wait=false`` (a create with ``&watch=true``: run as one that waits) and
``GET /api/operations/{id}`` is polled until it ends, each poll handed to ``progress``; so is it with a
``timeout``, which bounds the whole wait (``WAIT_TIMEOUT``). Polls ride out a hub that is briefly away (a
restart). A failure raises its ``ApiError`` either way. A service is named by its id, by a name of the
caller's own, or by ``owner/name``; every value put into a path is quoted as one segment.
"""

from __future__ import annotations

import builtins
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from hub.schemas import (
    AlertOut,
    AuditOut,
    ControllerImagesOut,
    ControllerOut,
    DeploymentOut,
    ImageOutcome,
    MeOut,
    ModelFileOut,
    ModelTypeOut,
    OperationOut,
    ServiceKeyCreated,
    ServiceKeyOut,
    ServiceMetricsOut,
    ServiceOut,
)
from mmanager.client.calls import Bound, Call, M, Notify, Pause, Steps, Upload, op, stream
from mmanager.client.errors import HUB_UNREACHABLE, ApiError, from_operation_error

if TYPE_CHECKING:
    from mmanager.client.jobs import ArtifactsApi, JobsApi, PipelinesApi
    from mmanager.client.users import TokensApi, UsersApi

T = TypeVar("T")

Progress = Callable[[OperationOut], Any]
# An operation's statuses while it is in progress (hub.services.operations.ACTIVE).
ACTIVE = ("pending", "running")
# A service id as the hub makes them (hub.models.new_id); anything else is a name.
_SERVICE_ID = re.compile(r"[0-9a-f]{32}")
# The most sequences the reference model service takes in one /predict/batch (docs/MODELSERVER.md).
BATCH_LIMIT = 100
# The most rows a list answers in one page (hub.routers.paging).
PAGE = 1000
# Seconds between two polls of an operation: from the first to the last.
POLL_FIRST, POLL_MOST = 0.1, 1.0
# A poll that finds the hub away (unreachable, or its proxy's 502/503/504: a restart) is tried again, the
# pause doubling from the first to the most, for at most RETRY_FOR seconds in a row (or the wait's timeout).
RETRY_FIRST, RETRY_MOST, RETRY_FOR = 0.5, 5.0, 300.0
_AWAY = (502, 503, 504)


def _seg(value: object) -> str:
    """``value`` as one path segment: a ``/``, ``..`` or ``?`` in it cannot reach another route."""
    return quote(str(value), safe="")


def _away(exc: ApiError) -> bool:
    return exc.code == HUB_UNREACHABLE or exc.status in _AWAY


def _me(runner: Any) -> Steps[MeOut]:
    me = runner.cache.get("me")
    if me is None:
        me = runner.cache["me"] = MeOut.model_validate((yield Call("GET", "/api/me")))
    return me


def _wait(op_id: str, progress: Progress | None, timeout: float | None,
          deadline: float | None = None) -> Steps[OperationOut]:
    """Poll the operation until it ends; ``progress`` gets it at each poll. ``timeout`` (or the monotonic
    ``deadline``) bounds the wait: past it, ``WAIT_TIMEOUT`` with ``details.operation_id``."""
    if deadline is None and timeout is not None:
        deadline = time.monotonic() + timeout
    delay, retry = POLL_FIRST, RETRY_FIRST
    away_since: float | None = None
    status = "running"
    while True:
        try:
            body = yield Call("GET", f"/api/operations/{_seg(op_id)}")
        except ApiError as exc:
            now = time.monotonic()
            away_since = now if away_since is None else away_since
            if not _away(exc) or now - away_since >= RETRY_FOR:
                raise
            if deadline is not None and now + retry >= deadline:
                raise _timed_out(op_id, status, timeout) from exc
            yield Pause(retry)
            retry = min(retry * 2, RETRY_MOST)
            continue
        away_since, retry = None, RETRY_FIRST
        operation = OperationOut.model_validate(body)
        status = operation.status
        if progress is not None:
            yield Notify(progress, operation)
        if operation.status not in ACTIVE:
            return operation
        if deadline is not None and time.monotonic() >= deadline:
            raise _timed_out(op_id, operation.status, timeout)
        yield Pause(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 1.5, POLL_MOST)


def _timed_out(op_id: str, status: str, timeout: float | None) -> ApiError:
    return ApiError(0, "WAIT_TIMEOUT", f"operation {op_id} is still {status} after {timeout} s (it goes on: "
                                       "follow it with operations.wait)", {"operation_id": op_id})


def _finished(operation: OperationOut) -> None:
    if operation.status != "succeeded":
        raise from_operation_error(operation.error, {"operation_id": operation.id, "operation": operation.operation})


def _launch(call: Call, wait: bool, progress: Progress | None, watch: bool = False,
            timeout: float | None = None) -> Steps[Any]:
    """Send a long operation's ``call``. Waiting without ``progress`` or ``timeout``: with ``?wait=true``, the
    hub answers once it is done. Else with ``?wait=false`` (and ``watch``, for a create that is waited for)
    and, when waiting, the operation polled until it ends or ``timeout`` seconds from now have passed. The
    body the hub answered, or the operation (ended, when waited for)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    hub_waits = wait and progress is None and timeout is None
    params = {**(call.params or {}), "wait": hub_waits, "watch": True if watch and wait and not hub_waits else None}
    body = yield Call(call.method, call.path, params=params, json=call.json, waits=hub_waits)
    if "operation" not in body:
        return body  # done (or nothing to do)
    operation = OperationOut.model_validate(body)
    if wait:
        # Also when the hub stopped waiting before the end (a drain past MMANAGER_DRAIN_TIMEOUT).
        operation = yield from _wait(operation.id, progress, timeout, deadline)
        _finished(operation)
    elif progress is not None:
        yield Notify(progress, operation)
    return operation


def _act(call: Call, wait: bool, progress: Progress | None, watch: bool = False,
         timeout: float | None = None) -> Steps[ServiceOut]:
    """A service's long operation (``_launch``); the service as it is then."""
    body = yield from _launch(call, wait, progress, watch, timeout)
    if not isinstance(body, OperationOut):
        return ServiceOut.model_validate(body)
    if body.service_id is None:
        raise ApiError(0, "BAD_ANSWER", f"operation {body.id} ({body.operation}) names no service",
                       {"operation_id": body.id})
    return ServiceOut.model_validate((yield Call("GET", f"/api/services/{_seg(body.service_id)}")))


class ServicesApi(Bound[M]):
    """``client.services``: a service is named by its id, by a name of the caller's own, or by
    ``owner/name`` (an admin naming another user's service) (``ref``). ``keys``: its gateway keys."""

    keys: ServiceKeysApi[M]

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self.keys = ServiceKeysApi[M](runner, self)

    def _by_name(self, ref: str) -> Steps[str]:
        owner, _, name = ref.rpartition("/")
        if not owner:
            owner = (yield from _me(self._runner)).username
        found = yield Call("GET", "/api/services", params={"name": name, "owner": owner})
        if not found:
            raise ApiError(404, "SERVICE_NOT_FOUND", f"{owner} has no service named {name!r}")
        return str(found[0]["id"])

    def _on(self, ref: str, steps: Callable[[str], Steps[T]]) -> Steps[T]:
        """``steps`` run on the id of the service ``ref`` names. An id-shaped ref is tried as an id first,
        with no look-up; answered SERVICE_NOT_FOUND, it may be a name (a service named with 32 hex digits)."""
        if not _SERVICE_ID.fullmatch(ref):
            return (yield from steps((yield from self._by_name(ref))))
        try:
            return (yield from steps(ref))
        except ApiError as exc:
            if exc.status != 404 or exc.code != "SERVICE_NOT_FOUND":
                raise
            missing = exc
        try:
            service_id = yield from self._by_name(ref)
        except ApiError as exc:
            if exc.status == 404:
                raise missing from None
            raise
        return (yield from steps(service_id))

    def _read(self, ref: str, tail: str = "", **call: Any) -> Steps[Any]:
        """``GET /api/services/{id}{tail}`` of the service ``ref`` names."""
        def steps(service_id: str) -> Steps[Any]:
            return (yield Call("GET", f"/api/services/{_seg(service_id)}{tail}", **call))
        return (yield from self._on(ref, steps))

    @op
    def list(self, name: str | None = None, owner: str | None = None, limit: int = 100,
             offset: int = 0, order: str = "oldest") -> Steps[builtins.list[ServiceOut]]:
        """``order``: ``oldest`` or ``newest`` first, by creation time."""
        params = {"name": name, "owner": owner, "limit": limit, "offset": offset,
                  "order": None if order == "oldest" else order}
        body = yield Call("GET", "/api/services", params=params)
        return [ServiceOut.model_validate(s) for s in body]

    @op
    def get(self, ref: str) -> Steps[ServiceOut]:
        """The status read (``GET /api/services/{id}``)."""
        return ServiceOut.model_validate((yield from self._read(ref)))

    @op
    def status(self, ref: str) -> Steps[ServiceOut]:
        """The service as its controllers see it now (``GET /api/services/{id}/status``)."""
        return ServiceOut.model_validate((yield from self._read(ref, "/status")))

    @op
    def create(self, spec: dict[str, Any], owner: str | None = None, repo: str = "default", wait: bool = True,
               progress: Progress | None = None, timeout: float | None = None) -> Steps[ServiceOut]:
        if owner is None:
            owner = (yield from _me(self._runner)).username
        return (yield from _act(Call("POST", f"/api/{_seg(owner)}/{_seg(repo)}/services", json=spec), wait,
                                progress, watch=True, timeout=timeout))

    def _change(self, ref: str, method: str, tail: str, body: dict[str, Any] | None, wait: bool,
                progress: Progress | None, timeout: float | None) -> Steps[ServiceOut]:
        def steps(service_id: str) -> Steps[ServiceOut]:
            return (yield from _act(Call(method, f"/api/services/{_seg(service_id)}{tail}", json=body), wait,
                                    progress, timeout=timeout))
        return (yield from self._on(ref, steps))

    @op
    def update(self, ref: str, patch: dict[str, Any], wait: bool = True, progress: Progress | None = None,
               timeout: float | None = None) -> Steps[ServiceOut]:
        return (yield from self._change(ref, "PATCH", "", patch, wait, progress, timeout))

    @op
    def start(self, ref: str, wait: bool = True, progress: Progress | None = None,
              timeout: float | None = None) -> Steps[ServiceOut]:
        return (yield from self._change(ref, "POST", "/start", None, wait, progress, timeout))

    @op
    def stop(self, ref: str, wait: bool = True, progress: Progress | None = None,
             timeout: float | None = None) -> Steps[ServiceOut]:
        return (yield from self._change(ref, "POST", "/stop", None, wait, progress, timeout))

    @op
    def restart(self, ref: str, wait: bool = True, progress: Progress | None = None,
                timeout: float | None = None) -> Steps[ServiceOut]:
        return (yield from self._change(ref, "POST", "/restart", None, wait, progress, timeout))

    @op
    def scale(self, ref: str, replicas: int, wait: bool = True, progress: Progress | None = None,
              timeout: float | None = None) -> Steps[ServiceOut]:
        return (yield from self._change(ref, "PATCH", "", {"replicas": replicas}, wait, progress, timeout))

    @op
    def migrate(self, ref: str, target: str | None = None, replica: str | None = None,
                leave_volumes: bool = False, wait: bool = True, progress: Progress | None = None,
                timeout: float | None = None) -> Steps[ServiceOut]:
        """Move one replica (an id from the status's ``replicas``; default the primary) to ``target`` or
        wherever the scheduler places it (admin)."""
        body: dict[str, Any] = {"target_controller": target, "replica": replica, "leave_volumes": leave_volumes}
        return (yield from self._change(ref, "POST", "/migrate", body, wait, progress, timeout))

    @op
    def rollback(self, ref: str, version: int, wait: bool = True, progress: Progress | None = None,
                 timeout: float | None = None) -> Steps[ServiceOut]:
        return (yield from self._change(ref, "POST", "/rollback", {"version": version}, wait, progress, timeout))

    @op
    def delete(self, ref: str) -> Steps[None]:
        def steps(service_id: str) -> Steps[None]:
            yield Call("DELETE", f"/api/services/{_seg(service_id)}", read="none")
        yield from self._on(ref, steps)

    @op
    def history(self, ref: str) -> Steps[builtins.list[DeploymentOut]]:
        return [DeploymentOut.model_validate(d) for d in (yield from self._read(ref, "/history"))]

    @op
    def logs(self, ref: str, tail: int = 100, replica: str | None = None) -> Steps[str]:
        return str((yield from self._read(ref, "/logs", params={"tail": tail, "replica": replica}, read="text")))

    @stream
    def follow_logs(self, ref: str, tail: int = 100, replica: str | None = None) -> Steps[Call]:
        """The service's log lines as they come, until the stream is closed (``close()``, a ``with`` block;
        async: ``aclose()``, ``async with``) or the service ends. A stream quiet for ``FOLLOW_QUIET`` seconds
        is opened again from its end; one whose hub has gone raises ``HUB_UNREACHABLE``."""
        # The stream's answer comes later: an id-shaped ref is checked here, so a name can still be found.
        service_id = yield from (self._on(ref, _exists) if _SERVICE_ID.fullmatch(ref) else self._by_name(ref))
        return Call("GET", f"/api/services/{_seg(service_id)}/logs",
                    params={"tail": tail, "replica": replica, "follow": True}, read="text",
                    resume={"tail": 0})

    @op
    def metrics(self, ref: str, since: datetime | None = None, resolution: int = 60) -> Steps[ServiceMetricsOut]:
        body = yield from self._read(ref, "/metrics", params={"since": since, "resolution": resolution})
        return ServiceMetricsOut.model_validate(body)


class ServiceKeysApi(Bound[M]):
    """``client.services.keys``: the keys a ``private`` service's callers send to its gateway route (its
    owner's and admins')."""

    _services: ServicesApi[M]

    def __init__(self, runner: Any, services: ServicesApi[M]) -> None:
        super().__init__(runner)
        self._services = services

    @op
    def create(self, ref: str, name: str | None = None) -> Steps[ServiceKeyCreated]:
        """A new key; its ``key`` is in this answer only (the hub keeps its SHA-256)."""
        def steps(service_id: str) -> Steps[Any]:
            return (yield Call("POST", f"/api/services/{_seg(service_id)}/keys", json={"name": name}))
        return ServiceKeyCreated.model_validate((yield from self._services._on(ref, steps)))

    @op
    def list(self, ref: str) -> Steps[builtins.list[ServiceKeyOut]]:
        """The service's keys, without the keys themselves."""
        return [ServiceKeyOut.model_validate(k) for k in (yield from self._services._read(ref, "/keys"))]

    @op
    def delete(self, ref: str, key_id: str) -> Steps[None]:
        """Revoke a key: the gateways refuse it within a second or so."""
        def steps(service_id: str) -> Steps[None]:
            yield Call("DELETE", f"/api/services/{_seg(service_id)}/keys/{_seg(key_id)}", read="none")
        yield from self._services._on(ref, steps)


def _exists(service_id: str) -> Steps[str]:
    """``service_id``, once the hub has said it is a service the caller may see."""
    yield Call("GET", f"/api/services/{_seg(service_id)}", read="none")
    return service_id


class ControllersApi(Bound[M]):
    """``client.controllers`` (admin)."""

    @op
    def list(self) -> Steps[builtins.list[ControllerOut]]:
        return [ControllerOut.model_validate(c) for c in (yield Call("GET", "/api/admin/controllers",
                                                                     params={"limit": 1000}))]

    @op
    def get(self, controller_id: str) -> Steps[ControllerOut]:
        return ControllerOut.model_validate((yield Call("GET", f"/api/admin/controllers/{_seg(controller_id)}")))

    @op
    def enable(self, controller_id: str) -> Steps[ControllerOut]:
        return ControllerOut.model_validate((yield Call("POST", f"/api/admin/controllers/{_seg(controller_id)}/enable")))

    @op
    def disable(self, controller_id: str) -> Steps[ControllerOut]:
        return ControllerOut.model_validate((yield Call("POST", f"/api/admin/controllers/{_seg(controller_id)}/disable")))

    @op
    def drain(self, controller_id: str, wait: bool = True, progress: Progress | None = None,
              timeout: float | None = None) -> Steps[ControllerOut]:
        """Disable the controller and move its services away; ``wait``: until they have all moved."""
        path = f"/api/admin/controllers/{_seg(controller_id)}"
        body = yield from _launch(Call("POST", f"{path}/drain"), wait, progress, timeout=timeout)
        if isinstance(body, OperationOut):
            body = yield Call("GET", path)
        return ControllerOut.model_validate(body)

    @op
    def update(self, controller_id: str, **changes: Any) -> Steps[ControllerOut]:
        """Change any of ``priority``, ``weight``, ``max_containers`` (the admin's cap; None lifts it),
        ``server_type`` and ``url``; the next placement uses them."""
        return ControllerOut.model_validate(
            (yield Call("PATCH", f"/api/admin/controllers/{_seg(controller_id)}", json=changes)))

    @op
    def delete(self, controller_id: str, drain: bool = False) -> Steps[None]:
        """Delete a controller that holds nothing (``CONTROLLER_HAS_SERVICES`` otherwise); ``drain``: move its
        services off first (the hub answers once they have moved)."""
        yield Call("DELETE", f"/api/admin/controllers/{_seg(controller_id)}",
                   params={"drain": "true"} if drain else None, read="none", waits=drain)


class OperationsApi(Bound[M]):
    """``client.operations``: a user's are those of their services."""

    @op
    def list(self, service_id: str | None = None, controller_id: str | None = None, status: str | None = None,
             operation: str | None = None, limit: int = 100, offset: int = 0) -> Steps[builtins.list[OperationOut]]:
        body = yield Call("GET", "/api/operations", params={
            "service_id": service_id, "controller_id": controller_id, "status": status, "operation": operation,
            "limit": limit, "offset": offset})
        return [OperationOut.model_validate(o) for o in body]

    @op
    def get(self, operation_id: str) -> Steps[OperationOut]:
        return OperationOut.model_validate((yield Call("GET", f"/api/operations/{_seg(operation_id)}")))

    @op
    def wait(self, operation_id: str, progress: Progress | None = None,
             timeout: float | None = None) -> Steps[OperationOut]:
        """The operation once it has ended (succeeded or failed: look at its ``status``)."""
        return (yield from _wait(operation_id, progress, timeout))


class AuditApi(Bound[M]):
    @op
    def list(self, actor: str | None = None, result: str | None = None, source: str | None = None,
             method: str | None = None, since: datetime | None = None, target: str | None = None,
             limit: int = 100, offset: int = 0) -> Steps[builtins.list[AuditOut]]:
        body = yield Call("GET", "/api/audit", params={
            "actor": actor, "result": result, "source": source, "method": method, "since": since,
            "target": target, "limit": limit, "offset": offset})
        return [AuditOut.model_validate(e) for e in body]


class AlertsApi(Bound[M]):
    @op
    def list(self, active: bool | None = None, limit: int = 100, offset: int = 0) -> Steps[builtins.list[AlertOut]]:
        body = yield Call("GET", "/api/alerts", params={"active": active, "limit": limit, "offset": offset})
        return [AlertOut.model_validate(a) for a in body]


class ModelsApi(Bound[M]):
    @op
    def list(self) -> Steps[builtins.list[ModelTypeOut]]:
        return [ModelTypeOut.model_validate(m) for m in (yield Call("GET", "/api/models", params={"limit": 1000}))]

    @op
    def get(self, name: str) -> Steps[ModelTypeOut]:
        return ModelTypeOut.model_validate((yield Call("GET", f"/api/models/{_seg(name)}")))


class ModelFilesApi(Bound[M]):
    """``client.model_files``: the hub's model-file store, files named by the sha256 of their bytes
    (``sha256:<hex>``) that a spec's ``models`` mounts read-only."""

    @op
    def upload(self, path: str | os.PathLike[str], name: str | None = None,
               progress: Callable[[int, int], Any] | None = None) -> Steps[ModelFileOut]:
        """Send the file at ``path`` as it is read, never whole in memory (``name``: default the digest's
        hex); ``progress(done_bytes, total_bytes)`` as it goes. The same bytes uploaded before answer the
        stored file (its first name kept)."""
        body = yield Call("POST", "/api/model-files", params={"name": name},
                          upload=Upload(os.fspath(path), progress))
        return ModelFileOut.model_validate(body)

    @op
    def list(self, limit: int = 100, offset: int = 0) -> Steps[builtins.list[ModelFileOut]]:
        """The stored files, oldest first."""
        body = yield Call("GET", "/api/model-files", params={"limit": limit, "offset": offset})
        return [ModelFileOut.model_validate(f) for f in body]

    @op
    def get(self, digest: str) -> Steps[ModelFileOut]:
        """One stored file's record (found in the list; ``MODEL_FILE_NOT_FOUND`` when it is not there)."""
        offset = 0
        while True:
            page = yield Call("GET", "/api/model-files", params={"limit": PAGE, "offset": offset})
            for found in page:
                if found.get("digest") == digest:
                    return ModelFileOut.model_validate(found)
            if len(page) < PAGE:
                raise ApiError(404, "MODEL_FILE_NOT_FOUND", f"model file {digest} is not in the store")
            offset += PAGE

    @op
    def delete(self, digest: str) -> Steps[None]:
        """Remove a file of the caller's own (an admin: any); ``MODEL_FILE_IN_USE`` while a spec names it."""
        yield Call("DELETE", f"/api/model-files/{_seg(digest)}", read="none")


class ImagesApi(Bound[M]):
    """``client.images`` (admin): the images on the controllers' servers. A pull or a prune asks each
    named controller once and answers each one's outcome (``ok``, else its ``error``): one controller's
    failure is no ``ApiError``, an unknown controller is (``CONTROLLER_NOT_FOUND``, and none is asked)."""

    @op
    def list(self, controller_id: str) -> Steps[ControllerImagesOut]:
        """The images on the controller's server; ``ok`` false with its ``error`` when it cannot say."""
        body = yield Call("GET", f"/api/admin/controllers/{_seg(controller_id)}/images")
        return ControllerImagesOut.model_validate(body)

    @op
    def pull(self, image: str, controllers: str | Sequence[str],
             registry_auth: Mapping[str, str] | None = None) -> Steps[builtins.list[ImageOutcome]]:
        """Each controller pulls ``image``, all at once; the answer comes when all are done (the hub waits
        up to ``MMANAGER_CONTROLLER_PULL_TIMEOUT`` for each). ``registry_auth`` ``{username, password}``:
        for this pull only, never stored."""
        body: dict[str, Any] = {"image": image, "controllers": _ids(controllers)}
        if registry_auth is not None:
            body["registry_auth"] = dict(registry_auth)
        answer = yield Call("POST", "/api/admin/images/pull", json=body, waits=True)
        return [ImageOutcome.model_validate(o) for o in answer]

    @op
    def prune(self, controllers: str | Sequence[str]) -> Steps[builtins.list[ImageOutcome]]:
        """Each controller removes its engine's dangling images (untagged, used by no container)."""
        answer = yield Call("POST", "/api/admin/images/prune", json={"controllers": _ids(controllers)}, waits=True)
        return [ImageOutcome.model_validate(o) for o in answer]


def _ids(controllers: str | Sequence[str]) -> builtins.list[str]:
    return [controllers] if isinstance(controllers, str) else builtins.list(controllers)


class Service(Bound[M]):
    """A handle on one service (``client.deploy``, ``client.service``): its status, its predictions through
    the gateway (with ``key``, the service key a private service needs), its logs, scale and delete."""

    _services: ServicesApi[M]

    def __init__(self, runner: Any, info: ServiceOut, key: str | None = None) -> None:
        super().__init__(runner)
        self.info = info
        self.key = key
        self._services = ServicesApi[M](runner)

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def url(self) -> str | None:
        return self.info.url

    def __repr__(self) -> str:
        return f"Service(id={self.id!r}, name={self.name!r}, status={self.info.status!r}, url={self.url!r})"

    @op
    def refresh(self) -> Steps[ServiceOut]:
        self.info = ServiceOut.model_validate((yield Call("GET", f"/api/services/{_seg(self.id)}")))
        return self.info

    @op
    def status(self) -> Steps[ServiceOut]:
        self.info = ServiceOut.model_validate((yield Call("GET", f"/api/services/{_seg(self.id)}/status")))
        return self.info

    @op
    def scale(self, replicas: int, wait: bool = True, progress: Progress | None = None,
              timeout: float | None = None) -> Steps[ServiceOut]:
        self.info = yield from _act(Call("PATCH", f"/api/services/{_seg(self.id)}", json={"replicas": replicas}),
                                    wait, progress, timeout=timeout)
        return self.info

    @op
    def delete(self) -> Steps[None]:
        yield Call("DELETE", f"/api/services/{_seg(self.id)}", read="none")

    def _predict(self, path: str, body: dict[str, Any]) -> Steps[Any]:
        if self.url is None:
            self.info = ServiceOut.model_validate((yield Call("GET", f"/api/services/{_seg(self.id)}")))
            if self.url is None:
                raise ApiError(0, "SERVICE_NOT_ROUTED", f"service {self.name!r} has no URL yet (status "
                                                        f"{self.info.status})")
        answer = yield Call("POST", path, json=body, base=self.url, token=self.key, hub_token=False)
        return answer.get("data") if isinstance(answer, dict) and "data" in answer else answer

    @op
    def predict(self, sequences: str | Sequence[str], task_type: str | None = None,
                **options: Any) -> Steps[Any]:
        """One sequence (``POST /predict``: its ``data``) or a few (``POST /predict/batch``: the list of their
        predictions); ``options``: the model service's (``return_confidence``, ``embedding_dimension``...)."""
        body: dict[str, Any] = {"task_type": task_type} if task_type else {}
        if options:
            body["options"] = options
        if isinstance(sequences, str):
            return (yield from self._predict("/predict", {"sequence": sequences, **body}))
        data = yield from self._predict("/predict/batch", {"sequences": list(sequences), **body})
        return data["predictions"]

    @op
    def predict_batch(self, sequences: Sequence[str], task_type: str | None = None, chunk: int = BATCH_LIMIT,
                      **options: Any) -> Steps[builtins.list[Any]]:
        """Any number of sequences, sent ``chunk`` at a time; their predictions, in order."""
        body: dict[str, Any] = {"task_type": task_type} if task_type else {}
        if options:
            body["options"] = options
        predictions: list[Any] = []
        for start in range(0, len(sequences), chunk):
            data = yield from self._predict("/predict/batch",
                                            {"sequences": list(sequences[start:start + chunk]), **body})
            predictions += data["predictions"]
        return predictions

    def logs(self, follow: bool = False, tail: int = 100, replica: str | None = None) -> Any:
        """The service's logs: their text, or (``follow``) an iterator of lines as they come (an async
        iterator on an ``AsyncClient``'s service)."""
        if follow:
            return self._services.follow_logs(self.id, tail=tail, replica=replica)
        return self._services.logs(self.id, tail=tail, replica=replica)


class Api(Bound[M]):
    """What ``Client`` and ``AsyncClient`` share: their namespaces, ``me``, ``service`` and ``deploy``."""

    services: ServicesApi[M]
    controllers: ControllersApi[M]
    operations: OperationsApi[M]
    audit: AuditApi[M]
    alerts: AlertsApi[M]
    models: ModelsApi[M]
    model_files: ModelFilesApi[M]
    images: ImagesApi[M]
    jobs: JobsApi[M]
    artifacts: ArtifactsApi[M]
    pipelines: PipelinesApi[M]
    users: UsersApi[M]
    tokens: TokensApi[M]

    def __init__(self, runner: Any) -> None:
        # Here, not at the top: mmanager.client.jobs and .users build on this module's helpers.
        from mmanager.client.jobs import ArtifactsApi, JobsApi, PipelinesApi
        from mmanager.client.users import TokensApi, UsersApi

        super().__init__(runner)
        self.services = ServicesApi[M](runner)
        self.controllers = ControllersApi[M](runner)
        self.operations = OperationsApi[M](runner)
        self.audit = AuditApi[M](runner)
        self.alerts = AlertsApi[M](runner)
        self.models = ModelsApi[M](runner)
        self.model_files = ModelFilesApi[M](runner)
        self.images = ImagesApi[M](runner)
        self.jobs = JobsApi[M](runner)
        self.artifacts = ArtifactsApi[M](runner)
        self.pipelines = PipelinesApi[M](runner)
        self.users = UsersApi[M](runner)
        self.tokens = TokensApi[M](runner)

    @op
    def me(self) -> Steps[MeOut]:
        return (yield from _me(self._runner))

    @op
    def service(self, ref: str, key: str | None = None) -> Steps[Service[M]]:
        """A handle on an existing service (``key``: a service key, for a private service's predictions)."""
        info = ServiceOut.model_validate((yield from self.services._read(ref)))
        return Service[M](self._runner, info, key)

    @op
    def deploy(self, model: str | None = None, name: str | None = None, replicas: int = 1,
               progress: Progress | None = None, key: str | None = None, timeout: float | None = None,
               **spec: Any) -> Steps[Service[M]]:
        """Create a service (of the catalog's ``model``, named after it unless ``name``; any other spec field
        in ``spec``) and wait until it runs (at most ``timeout`` seconds: ``WAIT_TIMEOUT``)."""
        body = {**spec, "name": name or model, "replicas": replicas}
        if model is not None:
            body["model"] = model
        info = yield from _act(Call("POST", f"/api/{_seg((yield from _me(self._runner)).username)}/default/services",
                                    json=body), True, progress, watch=True, timeout=timeout)
        return Service[M](self._runner, info, key)
