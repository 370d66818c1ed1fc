"""Reading a service: who may see it (``get_for``), the status read every client polls (``Reads.read``,
``read_json``) and the answer's shape (``Reads.to_out``).

The status read's two halves kept off the database and the renderer: ``Gathered`` sends the reads that
come together as one statement, ``Rendered`` keeps each service's answer until its row changes.

Invariant: an answer is never older than its call; a row is always read by a statement sent after the
call was made, and an answer is reused only while that row is equal to the one it was rendered from. A
service is seen by its owner and admins only; for anyone else it does not exist.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.base import Executable

from hub.db import Database
from hub.errors import NotFound
from hub.models import ServiceModel, UserModel
from hub.schemas import Endpoint, ReplicaOut, ServiceOut
from hub.services.gateway import GatewayDirectory
from hub.services.lifecycle.deploy import on_fallback
from hub.services.lifecycle.sql import REPLICA_ROWS, status_read
from hub.services.users import Identity

# The status reads' answers kept for rendering again only when their service changed (``read_json``): a
# few MiB at most.
RENDERED_READS = 4096


def require_visible(user: UserModel | Identity, owner_id: int | None, service_id: str) -> None:
    """A service (owned by ``owner_id``; None: there is none) is seen by its owner and admins; for anyone
    else it does not exist."""
    if owner_id is None or not (user.is_admin or owner_id == user.id):
        raise NotFound(f"service {service_id!r} not found", code="SERVICE_NOT_FOUND")


async def get_for(session: AsyncSession, user: UserModel, service_id: str) -> ServiceModel:
    """The service, if ``user`` may see it; another user's service does not exist for them."""
    service = await session.get(ServiceModel, service_id)
    require_visible(user, service.owner_id if service is not None else None, service_id)
    return service  # type: ignore[return-value]  # require_visible raised for None


class Reads:
    """The status read and the answer's shape."""

    def __init__(self, db: Database, gateways: GatewayDirectory) -> None:
        self.db = db
        self.gateways = gateways
        # The calls that come together share one statement, built once (so its cache key is computed once).
        self._gathered = Gathered(db, status_read(db.is_sqlite), "id")
        self._rendered = Rendered(RENDERED_READS)

    async def read(self, user: UserModel | Identity, service_id: str) -> ServiceOut:
        """The status read every client polls: the service as the hub knows it, with its owner's name, in
        one statement on a connection outside any transaction (no ORM session, no identity map), shared by
        the reads that come at the same time; a service of several replicas takes a second one, for them."""
        row = await self._row(user, service_id)
        copies = await self._copies(row)
        return self.to_out(SimpleNamespace(**row), owner=row["owner_name"], copies=copies)  # type: ignore[arg-type]  # a row has the model's columns

    async def read_json(self, user: UserModel | Identity, service_id: str) -> bytes:
        """``read``'s answer as the JSON the route sends, rendered again only when the service's row (and
        its replicas' rows) changed since it was last rendered (a service polled by many clients, or by one
        at a fast cadence, is mostly unchanged between two polls)."""
        row = await self._row(user, service_id)
        copies = await self._copies(row)
        # Keyed by the gateway's URL too: the answer's ``url`` starts with it.
        return self._rendered.get((service_id, self.gateways.url), (row, copies), lambda: self.to_out(
            SimpleNamespace(**row),  # type: ignore[arg-type]  # a row has the model's columns
            owner=row["owner_name"], copies=copies).model_dump_json().encode())

    async def out(self, service: ServiceModel) -> ServiceOut:
        """The answer for a service read by the caller, with its replicas."""
        return self.to_out(service, copies=await self._copies({"id": service.id, "replicas": service.replicas}))

    async def _copies(self, row: Mapping[str, Any]) -> Sequence[Mapping[str, Any]] | None:
        """The replicas' rows of a service that has several (one replica is the service's own row)."""
        if row["replicas"] <= 1:
            return None
        return await self.db.all(REPLICA_ROWS, {"service_id": row["id"]})

    async def _row(self, user: UserModel | Identity, service_id: str) -> Mapping[str, Any]:
        row = await self._gathered.first(service_id)
        require_visible(user, row["owner_id"] if row is not None else None, service_id)
        assert row is not None
        return row

    def to_out(self, service: ServiceModel, owner: str | None = None,
               copies: Sequence[Mapping[str, Any]] | None = None) -> ServiceOut:
        """``service`` may be a row with the model's columns; ``owner``, the owner's name, then too.
        ``copies``: its replicas' registry rows (None: its one copy is the service's own container)."""
        endpoint = Endpoint.model_validate(service.endpoint) if service.endpoint else None
        owner = owner if owner is not None else service.owner.username
        if copies is not None:
            # The primary copy first, then by epoch.
            copies = sorted(copies, key=lambda copy: copy["container_id"] != service.container_id)
            replicas = [ReplicaOut(id=copy["container_id"] or copy["id"], controller_id=copy["controller_id"],
                                   state=copy["status"], health=copy["health"],
                                   health_detail=copy["health_detail"],
                                   endpoint=copy["endpoint"] if copy["status"] == "running" else None,
                                   variant=_variant(service.spec, copy["gpu_devices"]))
                        for copy in copies]
        elif service.controller_id is not None:
            replicas = [ReplicaOut(id=service.container_id or service.id, controller_id=service.controller_id,
                                   state=service.status, health=service.health,
                                   health_detail=service.health_detail, endpoint=endpoint,
                                   variant=_variant(service.spec, service.gpu_devices))]
        else:
            replicas = []
        return ServiceOut(
            id=service.id,
            name=service.name,
            owner=owner,
            repo=service.repo,
            spec=service.spec,
            version=service.version,
            desired_state=service.desired_state,  # type: ignore[arg-type]  # the column holds the Literal's values
            status=service.status,
            status_message=service.status_message,
            controller_id=service.controller_id,
            container_id=service.container_id,
            epoch=service.epoch,
            endpoint=endpoint,
            url=self._url(service, owner, endpoint),
            health=service.health,
            health_detail=service.health_detail,
            replicas=replicas,
            created_at=service.created_at,
            updated_at=service.updated_at,
            variant=_variant(service.spec, service.gpu_devices) if service.controller_id is not None else "main",
        )

    def _url(self, service: ServiceModel, owner: str, endpoint: Endpoint | None) -> str | None:
        """The gateway's URL for the service once a gateway runs; before that, where its container answers."""
        routed = self.gateways.service_url(owner, service.name)
        if routed is not None:
            return routed
        if endpoint is None or service.status != "running":
            return None
        for port in endpoint.ports.values():
            if port:
                return f"http://{endpoint.host}:{port}"
        return None


def _variant(spec: Mapping[str, Any], gpus: Any) -> Literal["main", "cpu_fallback"]:
    return "cpu_fallback" if on_fallback(spec, gpus) else "main"


class Rendered:
    """The last answer rendered from each of the most recently read keys' rows, used again while the row read
    is the same (equal, column for column) as the one it was rendered from; rendered anew when it is not.

    At most ``most`` keys are kept; past that the one kept longest goes. A read still reads its row every
    time (an answer is never older than its read), only the rendering is skipped.
    """

    def __init__(self, most: int) -> None:
        self.most = most
        self._last: dict[Any, tuple[Any, bytes]] = {}

    def get(self, key: Any, row: Any, render: Callable[[], bytes]) -> bytes:
        last = self._last.get(key)
        if last is not None and (last[0] is row or last[0] == row):
            return last[1]
        body = render()
        if last is None and len(self._last) >= self.most:
            del self._last[next(iter(self._last))]
        self._last[key] = (row, body)
        return body


class Gathered:
    """Reads of one row by its key, made together: the calls that come while a read is on its way are
    answered by the next one, a single statement for all their keys (as a DataLoader does).

    ``statement`` reads the rows whose ``key`` column is one of the list parameter ``keys`` (``any_of``). A
    call's row always comes from a statement sent after the call was made, never from one already on its
    way, so it sees at least what was committed before it was called, as its own statement would. At most
    ``in_flight`` statements are on their way at once, each for at most ``most`` keys; calls for one key
    share its row. A statement that fails is tried again for each of its keys alone, so one key the
    database refuses (a NUL character) fails only its own calls. Under load (32 status reads at once) one
    statement serves several calls, and each pays a fraction of asyncpg's round trip and the pool's
    checkout; a lone call pays one task switch more than a statement of its own.
    """

    def __init__(self, db: Database, statement: Executable, key: str, *, most: int = 256, in_flight: int = 2) -> None:
        self.db = db
        self.statement = statement
        self.key = key
        self.most = most
        self.in_flight = in_flight
        self._waiting: dict[Any, list[asyncio.Future[Mapping[str, Any] | None]]] = {}
        # Senders running. Counted down as a sender's last act, not by a done-callback a loop pass later:
        # a call made in between would otherwise see no free slot and wait with nobody to send it.
        self._sending = 0
        self._senders: set[asyncio.Task[None]] = set()

    async def first(self, key: Any) -> Mapping[str, Any] | None:
        """The row of ``key``, or None when there is none."""
        future: asyncio.Future[Mapping[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._sending < self.in_flight:
            self._sending += 1
            # A context of its own: what it logs is no one caller's (not the request id of the call that
            # happened to start it).
            sender = asyncio.create_task(self._send(), context=contextvars.Context())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await future

    async def _send(self) -> None:
        try:
            while self._waiting:
                keys = list(self._waiting)[:self.most]
                batch = {k: self._waiting.pop(k) for k in keys}
                try:
                    rows = await self.db.all(self.statement, {"keys": keys})
                except asyncio.CancelledError:
                    _fail(batch.values(), None)
                    raise
                except Exception as exc:
                    if len(batch) == 1:
                        _fail(batch.values(), exc)
                        continue
                    for k, futures in batch.items():
                        await self._alone(k, futures)
                    continue
                self._answer(batch, rows)
        finally:
            self._sending -= 1

    async def _alone(self, key: Any, futures: list[asyncio.Future[Mapping[str, Any] | None]]) -> None:
        try:
            rows = await self.db.all(self.statement, {"keys": [key]})
        except asyncio.CancelledError:
            _fail([futures], None)
            raise
        except Exception as exc:
            _fail([futures], exc)
            return
        self._answer({key: futures}, rows)

    def _answer(self, batch: Mapping[Any, list[asyncio.Future[Mapping[str, Any] | None]]],
                rows: Sequence[Mapping[str, Any]]) -> None:
        found = {row[self.key]: row for row in rows}
        for k, futures in batch.items():
            row = found.get(k)
            for future in futures:
                if not future.done():
                    future.set_result(row)


def _fail(batches: Iterable[list[asyncio.Future[Any]]], exc: BaseException | None) -> None:
    """Fail every call still waiting in ``batches`` (lists of futures) with ``exc``; None: cancel them."""
    for futures in batches:
        for future in futures:
            if not future.done():
                if exc is None:
                    future.cancel()
                else:
                    future.set_exception(exc)
