"""The SDK's calls, each written once as steps (``mmanager.client.calls``) and typed with the hub's own wire
models (``hub.schemas``): the namespaces ``services``, ``controllers``, ``operations``, ``audit``,
``alerts`` and ``models``, the client's own ``me`` and ``deploy``, and the ``Service`` handle.

Invariant: a call that starts a long operation and waits ends where the hub's own ``?wait=true`` ends (a
create of a service with a probe: at its verdict). Without ``progress`` it is that call; with ``progress``
it is sent with ``?wait=false`` (a create with ``&watch=true``: run as one that waits) and
``GET /api/operations/{id}`` is polled until it ends, each poll handed to ``progress``. A failure raises
its ``ApiError`` either way. A service is named by its id or by a name of the caller's own.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from hub.schemas import (
    AlertOut,
    AuditOut,
    ControllerOut,
    DeploymentOut,
    MeOut,
    ModelTypeOut,
    OperationOut,
    ServiceMetricsOut,
    ServiceOut,
)
from mmanager.client.calls import Bound, Call, M, Notify, Pause, Steps, op, stream
from mmanager.client.errors import ApiError, from_operation_error

Progress = Callable[[OperationOut], Any]
# An operation's statuses while it is in progress (hub.services.operations.ACTIVE).
ACTIVE = ("pending", "running")
# A service id as the hub makes them (hub.models.new_id); anything else is a name.
_SERVICE_ID = re.compile(r"[0-9a-f]{32}")
# The most sequences the reference model service takes in one /predict/batch (docs/MODELSERVER.md).
BATCH_LIMIT = 100
# Seconds between two polls of an operation: from the first to the last.
POLL_FIRST, POLL_MOST = 0.1, 1.0


def _me(runner: Any) -> Steps[MeOut]:
    me = runner.cache.get("me")
    if me is None:
        me = runner.cache["me"] = MeOut.model_validate((yield Call("GET", "/api/me")))
    return me


def _wait(op_id: str, progress: Progress | None, timeout: float | None) -> Steps[OperationOut]:
    """Poll the operation until it ends; ``progress`` gets it at each poll."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = POLL_FIRST
    while True:
        operation = OperationOut.model_validate((yield Call("GET", f"/api/operations/{op_id}")))
        if progress is not None:
            yield Notify(progress, operation)
        if operation.status not in ACTIVE:
            return operation
        if deadline is not None and time.monotonic() >= deadline:
            raise ApiError(0, "WAIT_TIMEOUT", f"operation {op_id} is still {operation.status} after {timeout} s",
                           {"operation_id": op_id})
        yield Pause(delay)
        delay = min(delay * 1.5, POLL_MOST)


def _finished(operation: OperationOut) -> None:
    if operation.status != "succeeded":
        raise from_operation_error(operation.error, {"operation_id": operation.id, "operation": operation.operation})


def _launch(call: Call, wait: bool, progress: Progress | None, watch: bool = False) -> Steps[Any]:
    """Send a long operation's ``call``. Waiting without ``progress``: with ``?wait=true``, the hub answers
    once it is done. Else with ``?wait=false`` (and ``watch``, for a create that is waited for) and, when
    waiting, the operation polled until it ends. The body the hub answered, or the operation (ended, when
    waited for)."""
    hub_waits = wait and progress is None
    params = {**(call.params or {}), "wait": hub_waits, "watch": True if watch and wait and not hub_waits else None}
    body = yield Call(call.method, call.path, params=params, json=call.json, waits=hub_waits)
    if "operation" not in body:
        return body  # done (or nothing to do)
    operation = OperationOut.model_validate(body)
    if wait:
        # Also when the hub stopped waiting before the end (a drain past MMANAGER_DRAIN_TIMEOUT).
        operation = yield from _wait(operation.id, progress, None)
        _finished(operation)
    elif progress is not None:
        yield Notify(progress, operation)
    return operation


def _act(call: Call, wait: bool, progress: Progress | None, watch: bool = False) -> Steps[ServiceOut]:
    """A service's long operation (``_launch``); the service as it is then."""
    body = yield from _launch(call, wait, progress, watch)
    if not isinstance(body, OperationOut):
        return ServiceOut.model_validate(body)
    assert body.service_id is not None
    return ServiceOut.model_validate((yield Call("GET", f"/api/services/{body.service_id}")))


class ServicesApi(Bound[M]):
    """``client.services``: a service is named by its id, or by a name of the caller's own (``ref``)."""

    def _id(self, ref: str) -> Steps[str]:
        if _SERVICE_ID.fullmatch(ref):
            return ref
        me = yield from _me(self._runner)
        found = yield Call("GET", "/api/services", params={"name": ref, "owner": me.username})
        if not found:
            raise ApiError(404, "SERVICE_NOT_FOUND", f"you have no service named {ref!r}")
        return str(found[0]["id"])

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
        service_id = yield from self._id(ref)
        return ServiceOut.model_validate((yield Call("GET", f"/api/services/{service_id}")))

    @op
    def status(self, ref: str) -> Steps[ServiceOut]:
        """The service as its controllers see it now (``GET /api/services/{id}/status``)."""
        service_id = yield from self._id(ref)
        return ServiceOut.model_validate((yield Call("GET", f"/api/services/{service_id}/status")))

    @op
    def create(self, spec: dict[str, Any], owner: str | None = None, repo: str = "default", wait: bool = True,
               progress: Progress | None = None) -> Steps[ServiceOut]:
        if owner is None:
            owner = (yield from _me(self._runner)).username
        return (yield from _act(Call("POST", f"/api/{owner}/{repo}/services", json=spec), wait, progress, watch=True))

    @op
    def update(self, ref: str, patch: dict[str, Any], wait: bool = True,
               progress: Progress | None = None) -> Steps[ServiceOut]:
        service_id = yield from self._id(ref)
        return (yield from _act(Call("PATCH", f"/api/services/{service_id}", json=patch), wait, progress))

    def _action(self, ref: str, action: str, wait: bool, progress: Progress | None,
                body: dict[str, Any] | None = None) -> Steps[ServiceOut]:
        service_id = yield from self._id(ref)
        return (yield from _act(Call("POST", f"/api/services/{service_id}/{action}", json=body), wait, progress))

    @op
    def start(self, ref: str, wait: bool = True, progress: Progress | None = None) -> Steps[ServiceOut]:
        return (yield from self._action(ref, "start", wait, progress))

    @op
    def stop(self, ref: str, wait: bool = True, progress: Progress | None = None) -> Steps[ServiceOut]:
        return (yield from self._action(ref, "stop", wait, progress))

    @op
    def restart(self, ref: str, wait: bool = True, progress: Progress | None = None) -> Steps[ServiceOut]:
        return (yield from self._action(ref, "restart", wait, progress))

    @op
    def scale(self, ref: str, replicas: int, wait: bool = True,
              progress: Progress | None = None) -> Steps[ServiceOut]:
        service_id = yield from self._id(ref)
        return (yield from _act(Call("PATCH", f"/api/services/{service_id}", json={"replicas": replicas}),
                                wait, progress))

    @op
    def migrate(self, ref: str, target: str | None = None, replica: str | None = None,
                leave_volumes: bool = False, wait: bool = True,
                progress: Progress | None = None) -> Steps[ServiceOut]:
        """Move one replica (an id from the status's ``replicas``; default the primary) to ``target`` or
        wherever the scheduler places it (admin)."""
        body: dict[str, Any] = {"target_controller": target, "replica": replica, "leave_volumes": leave_volumes}
        return (yield from self._action(ref, "migrate", wait, progress, body))

    @op
    def rollback(self, ref: str, version: int, wait: bool = True,
                 progress: Progress | None = None) -> Steps[ServiceOut]:
        return (yield from self._action(ref, "rollback", wait, progress, {"version": version}))

    @op
    def delete(self, ref: str) -> Steps[None]:
        service_id = yield from self._id(ref)
        yield Call("DELETE", f"/api/services/{service_id}", read="none")

    @op
    def history(self, ref: str) -> Steps[builtins.list[DeploymentOut]]:
        service_id = yield from self._id(ref)
        return [DeploymentOut.model_validate(d) for d in (yield Call("GET", f"/api/services/{service_id}/history"))]

    @op
    def logs(self, ref: str, tail: int = 100, replica: str | None = None) -> Steps[str]:
        service_id = yield from self._id(ref)
        text = yield Call("GET", f"/api/services/{service_id}/logs", params={"tail": tail, "replica": replica},
                          read="text")
        return str(text)

    @stream
    def follow_logs(self, ref: str, tail: int = 100, replica: str | None = None) -> Steps[Call]:
        """The service's log lines as they come, until the iterator is closed or the service ends."""
        service_id = yield from self._id(ref)
        return Call("GET", f"/api/services/{service_id}/logs",
                    params={"tail": tail, "replica": replica, "follow": True}, read="text")

    @op
    def metrics(self, ref: str, since: datetime | None = None, resolution: int = 60) -> Steps[ServiceMetricsOut]:
        service_id = yield from self._id(ref)
        body = yield Call("GET", f"/api/services/{service_id}/metrics",
                          params={"since": since, "resolution": resolution})
        return ServiceMetricsOut.model_validate(body)


class ControllersApi(Bound[M]):
    """``client.controllers`` (admin)."""

    @op
    def list(self) -> Steps[builtins.list[ControllerOut]]:
        return [ControllerOut.model_validate(c) for c in (yield Call("GET", "/api/admin/controllers",
                                                                     params={"limit": 1000}))]

    @op
    def get(self, controller_id: str) -> Steps[ControllerOut]:
        return ControllerOut.model_validate((yield Call("GET", f"/api/admin/controllers/{controller_id}")))

    @op
    def enable(self, controller_id: str) -> Steps[ControllerOut]:
        return ControllerOut.model_validate((yield Call("POST", f"/api/admin/controllers/{controller_id}/enable")))

    @op
    def disable(self, controller_id: str) -> Steps[ControllerOut]:
        return ControllerOut.model_validate((yield Call("POST", f"/api/admin/controllers/{controller_id}/disable")))

    @op
    def drain(self, controller_id: str, wait: bool = True, progress: Progress | None = None) -> Steps[ControllerOut]:
        """Disable the controller and move its services away; ``wait``: until they have all moved."""
        path = f"/api/admin/controllers/{controller_id}"
        body = yield from _launch(Call("POST", f"{path}/drain"), wait, progress)
        if isinstance(body, OperationOut):
            body = yield Call("GET", path)
        return ControllerOut.model_validate(body)


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
        return OperationOut.model_validate((yield Call("GET", f"/api/operations/{operation_id}")))

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
        return ModelTypeOut.model_validate((yield Call("GET", f"/api/models/{name}")))


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
        self.info = ServiceOut.model_validate((yield Call("GET", f"/api/services/{self.id}")))
        return self.info

    @op
    def status(self) -> Steps[ServiceOut]:
        self.info = ServiceOut.model_validate((yield Call("GET", f"/api/services/{self.id}/status")))
        return self.info

    @op
    def scale(self, replicas: int, wait: bool = True, progress: Progress | None = None) -> Steps[ServiceOut]:
        self.info = yield from _act(Call("PATCH", f"/api/services/{self.id}", json={"replicas": replicas}),
                                    wait, progress)
        return self.info

    @op
    def delete(self) -> Steps[None]:
        yield Call("DELETE", f"/api/services/{self.id}", read="none")

    def _predict(self, path: str, body: dict[str, Any]) -> Steps[Any]:
        if self.url is None:
            self.info = ServiceOut.model_validate((yield Call("GET", f"/api/services/{self.id}")))
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

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self.services = ServicesApi[M](runner)
        self.controllers = ControllersApi[M](runner)
        self.operations = OperationsApi[M](runner)
        self.audit = AuditApi[M](runner)
        self.alerts = AlertsApi[M](runner)
        self.models = ModelsApi[M](runner)

    @op
    def me(self) -> Steps[MeOut]:
        return (yield from _me(self._runner))

    @op
    def service(self, ref: str, key: str | None = None) -> Steps[Service[M]]:
        """A handle on an existing service (``key``: a service key, for a private service's predictions)."""
        service_id = yield from self.services._id(ref)
        info = ServiceOut.model_validate((yield Call("GET", f"/api/services/{service_id}")))
        return Service[M](self._runner, info, key)

    @op
    def deploy(self, model: str | None = None, name: str | None = None, replicas: int = 1,
               progress: Progress | None = None, key: str | None = None, **spec: Any) -> Steps[Service[M]]:
        """Create a service (of the catalog's ``model``, named after it unless ``name``; any other spec field
        in ``spec``) and wait until it runs."""
        body = {**spec, "name": name or model, "replicas": replicas}
        if model is not None:
            body["model"] = model
        info = yield from _act(Call("POST", f"/api/{(yield from _me(self._runner)).username}/default/services",
                                    json=body), True, progress, watch=True)
        return Service[M](self._runner, info, key)
