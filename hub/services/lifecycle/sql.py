"""Every statement the lifecycle sends, built once at import (so each is compiled once and its cache key
computed once), and the one deletion of a registry row.

Invariant: a statement here binds every value it is given by name and writes only the columns it names
(on SQLite, SQLAlchemy would also SET a parameter named after a column).
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, insert, or_, select, update

from hub.db import Database, any_of
from hub.models import (
    ContainerRegistryModel,
    ControllerModel,
    DeploymentHistoryModel,
    ServiceModel,
    UserModel,
)

REGISTRY = ContainerRegistryModel.__table__
SERVICES = ServiceModel.__table__
CONTROLLERS = ControllerModel.__table__
HISTORY = DeploymentHistoryModel.__table__
USERS = UserModel.__table__


@functools.cache
def status_read(sqlite: bool) -> Select[Any]:
    """The status reads' statement: the services of a list of ids (``keys``) with their owners' names (not
    their sealed registry credentials and secrets, which no read shows)."""
    shown = [column for column in SERVICES.c if column.key not in ("registry_auth_sealed", "secrets_sealed")]
    return (select(*shown, UserModel.username.label("owner_name"))
            .join_from(ServiceModel, UserModel, ServiceModel.owner_id == UserModel.id)
            .where(any_of(SERVICES.c.id, "keys", sqlite=sqlite)))


# ---------------------------------------------------------------- create

# A create's owner named by an admin.
OWNER_BY_NAME = select(UserModel).where(UserModel.username == bindparam("username"))
ROW_COLUMNS = [c.key for c in REGISTRY.columns]
# The registry row, inserted only while its controller is healthy, enabled and not draining. The controller's
# row is locked (FOR KEY SHARE, until the transaction ends) so that a DELETE of the controller (FOR UPDATE, then
# its holdings read) waits for this row to commit and sees it, or deletes first and this inserts nothing.
INSERT_ROW_IF_PLACEABLE = insert(REGISTRY).from_select(
    ROW_COLUMNS,
    select(*(bindparam(key, type_=REGISTRY.c[key].type).label(key) for key in ROW_COLUMNS)).where(
        CONTROLLERS.c.id == bindparam("place_on"), CONTROLLERS.c.status == "healthy",
        CONTROLLERS.c.enabled.is_(True), CONTROLLERS.c.draining.is_(False),
    ).with_for_update(read=True, key_share=True),
)


@functools.cache
def batch_rows(sqlite: bool) -> Select[Any]:
    """A batch's registry rows (``ids``) as they are now: after INSERT_ROW_IF_PLACEABLE, those whose controller
    took them; after SETTLE_EACH, which took their container (a superseded one did not)."""
    return select(REGISTRY.c.id, REGISTRY.c.container_id, REGISTRY.c.status, REGISTRY.c.health).where(
        any_of(REGISTRY.c.id, "ids", sqlite=sqlite))


# The created container on its reserved row, one of the service's replicas from now on, unless the row was
# superseded meanwhile.
SETTLE_EACH = (
    update(REGISTRY)
    .where(REGISTRY.c.id == bindparam("row_id"), REGISTRY.c.status != "stale")
    .values(container_id=bindparam("container_id"), container_name=bindparam("container_name"),
            status=bindparam("status"), endpoint=bindparam("endpoint", type_=REGISTRY.c.endpoint.type),
            serving=True, updated_at=bindparam("updated_at"))
)
SETTLE_ROW = SETTLE_EACH.returning(REGISTRY.c.health)


# The create's end: its service pointing at the container, unless another operation got there first.
SETTLE_CREATED = (
    update(SERVICES)
    .where(SERVICES.c.id == bindparam("service_id"), SERVICES.c.epoch == bindparam("at_epoch"),
           SERVICES.c.controller_id.is_(None))
    .values({key: bindparam(key, type_=SERVICES.c[key].type) for key in (
        "controller_id", "container_id", "gpu_devices", "status", "endpoint", "status_message", "updated_at",
        "health")})
)

# ------------------------------------------------------------------ moves

CLAIM_EPOCH = (
    update(SERVICES)
    .where(SERVICES.c.id == bindparam("service_id"), SERVICES.c.epoch == bindparam("seen"))
    .values(epoch=bindparam("next_epoch"), status="migrating", updated_at=bindparam("updated_at"))
)
# The same for a copy beside others that keep serving: the service's status stays what it is.
CLAIM_EPOCH_BESIDE = (
    update(SERVICES)
    .where(SERVICES.c.id == bindparam("service_id"), SERVICES.c.epoch == bindparam("seen"))
    .values(epoch=bindparam("next_epoch"), updated_at=bindparam("updated_at"))
)
# A replace's settle: the service, its row locked until the transaction ends (SQLite locks the whole
# database anyway), made to point at the new copy; every other copy stale.
LOCK_SERVICE = select(SERVICES).where(SERVICES.c.id == bindparam("service_id")).with_for_update()
FINALIZED = ("epoch", "controller_id", "container_id", "gpu_devices", "spec", "health", "health_detail", "version",
             "status", "endpoint", "status_message", "updated_at")
FINALIZE = (
    update(SERVICES)
    .where(SERVICES.c.id == bindparam("service_id"))
    .values({key: bindparam(key, type_=SERVICES.c[key].type) for key in FINALIZED})
)
# A copy that is not the primary: the service takes its epoch (and a changed spec) only.
FINALIZE_BESIDE = (
    update(SERVICES)
    .where(SERVICES.c.id == bindparam("service_id"))
    .values({key: bindparam(key, type_=SERVICES.c[key].type) for key in ("epoch", "spec", "version", "updated_at")})
)
# The replaced replica (if any) and creates begun and never finished, but not the new copy, nor the other
# replicas.
RETIRE_REPLACED = (
    update(REGISTRY)
    .where(REGISTRY.c.service_id == bindparam("of_service"), REGISTRY.c.id != bindparam("keep_row"),
           or_(REGISTRY.c.id == bindparam("replaced_row"), REGISTRY.c.serving.is_(False)))
    .values(status="stale", updated_at=bindparam("updated_at"))
)
LATEST_VERSION = select(func.max(HISTORY.c.version).label("latest")).where(
    HISTORY.c.service_id == bindparam("service_id"))
PAST_VERSION = select(DeploymentHistoryModel).where(
    DeploymentHistoryModel.service_id == bindparam("service_id"),
    DeploymentHistoryModel.version == bindparam("version"))
# A moved copy's probe passed: the service, if still at that copy, and the copy's row, unless retired
# meanwhile, read healthy.
FOLLOWED_SERVICE = (
    update(SERVICES)
    .where(SERVICES.c.id == bindparam("service_id"), SERVICES.c.epoch == bindparam("at_epoch"),
           SERVICES.c.container_id == bindparam("copy_id"), SERVICES.c.health != "healthy")
    .values(health="healthy", health_detail=None, updated_at=bindparam("updated_at"))
)
FOLLOWED_ROW = (
    update(REGISTRY)
    .where(REGISTRY.c.id == bindparam("row_id"), REGISTRY.c.container_id == bindparam("copy_id"),
           REGISTRY.c.status != "stale")
    .values(health="healthy", health_detail=None, updated_at=bindparam("updated_at"))
)
# A service's rows that are not superseded: its replicas (``serving``) and creates begun and never finished.
LIVE_ROWS = select(REGISTRY).where(REGISTRY.c.service_id == bindparam("service_id"),
                                   REGISTRY.c.status != "stale", REGISTRY.c.status != "draining")
# A service's replicas, by epoch.
REPLICA_ROWS = (select(REGISTRY).where(REGISTRY.c.service_id == bindparam("service_id"), REGISTRY.c.serving.is_(True),
                                       REGISTRY.c.status != "stale", REGISTRY.c.status != "draining")
                .order_by(REGISTRY.c.epoch))


@functools.cache
def healthy_controllers(sqlite: bool) -> Select[Any]:
    """The healthy ones of a list of controllers (``ids``)."""
    return select(CONTROLLERS).where(CONTROLLERS.c.status == "healthy", any_of(CONTROLLERS.c.id, "ids", sqlite=sqlite))


# A move's service, with what of its owner a move needs (the owner's volumes are named by id and name).
MOVED = (select(SERVICES, USERS.c.username.label("owner_username"), USERS.c.is_admin.label("owner_is_admin"))
         .join_from(SERVICES, USERS, SERVICES.c.owner_id == USERS.c.id)
         .where(SERVICES.c.id == bindparam("service_id")))
# A service's superseded copies, with their controllers' status (those that answer now are removed at once).
STALE_COPIES = (
    select(REGISTRY.c.id, REGISTRY.c.controller_id, REGISTRY.c.container_id, CONTROLLERS.c.status)
    .select_from(REGISTRY.outerjoin(CONTROLLERS, CONTROLLERS.c.id == REGISTRY.c.controller_id))
    .where(REGISTRY.c.service_id == bindparam("service_id"), REGISTRY.c.status == "stale")
)
# Superseded copies a planned move keeps until the gateways stop sending them requests: heartbeats leave
# them alone (hub.scheduler.reconcile.fence) until the move removes them.
DRAINING = (update(REGISTRY).where(REGISTRY.c.service_id == bindparam("of_service"), REGISTRY.c.status == "stale")
            .values(status="draining", updated_at=bindparam("updated_at")))
# A service marked lost: the row of its current container.
SERVING_ROW = select(ContainerRegistryModel).where(
    ContainerRegistryModel.service_id == bindparam("service_id"),
    ContainerRegistryModel.container_id == bindparam("container_id"))

# ---------------------------------------------------------------- actions

# What Docker said of a container, on its registry rows: its status, and where it answers when it runs (a
# copy that stopped keeps its last endpoint: routing goes by the status, and a copy its controller restarts
# answers there again).
COPY_STATUS = (update(REGISTRY).where(REGISTRY.c.container_id == bindparam("of_container"))
               .values(status=bindparam("status"), updated_at=bindparam("updated_at")))
COPY_RUNS = (update(REGISTRY).where(REGISTRY.c.container_id == bindparam("of_container"))
             .values(status=bindparam("status"), endpoint=bindparam("endpoint", type_=REGISTRY.c.endpoint.type),
                     updated_at=bindparam("updated_at")))
# A copy a rolling restart takes out of the gateways' tables until it serves again (heartbeats leave it be).
DRAIN_COPY = (update(REGISTRY).where(REGISTRY.c.container_id == bindparam("of_container"), REGISTRY.c.status != "stale")
              .values(status="draining", updated_at=bindparam("updated_at")))
# The same for a copy with a golden-inference probe: its health from before says nothing of the new start.
DRAIN_PROBED_COPY = DRAIN_COPY.values(health="unknown", health_detail=None)
# A copy with a golden-inference probe that starts again: unknown until the new start passes it.
UNJUDGED_COPY = (update(REGISTRY).where(REGISTRY.c.container_id == bindparam("of_container"))
                 .values(health="unknown", health_detail=None, updated_at=bindparam("updated_at")))
# What a golden-inference probe found of a copy that started again.
JUDGED_COPY = (update(REGISTRY).where(REGISTRY.c.container_id == bindparam("of_container"))
               .values(health=bindparam("health"), health_detail=bindparam("health_detail"),
                       updated_at=bindparam("updated_at")))
# A replica removed by a scale-down, marked so while the gateways stop sending it requests.
DRAIN_ROW = (update(REGISTRY).where(REGISTRY.c.id == bindparam("row_id"))
             .values(status="draining", updated_at=bindparam("updated_at")))
# The service's primary copy moved to another of its replicas (its own was scaled away).
REPOINT = (
    update(SERVICES)
    .where(SERVICES.c.id == bindparam("service_id"))
    .values({key: bindparam(key, type_=SERVICES.c[key].type) for key in (
        "controller_id", "container_id", "gpu_devices", "endpoint", "health", "health_detail", "updated_at")})
)
# A scale's new count.
SET_REPLICAS = (update(SERVICES).where(SERVICES.c.id == bindparam("service_id"))
                .values(replicas=bindparam("replicas"), spec=bindparam("spec", type_=SERVICES.c.spec.type),
                        updated_at=bindparam("updated_at")))
# A service's registry credentials, sealed (a PATCH's registry_auth: set, replaced or cleared).
SET_REGISTRY_AUTH = (update(SERVICES).where(SERVICES.c.id == bindparam("service_id"))
                     .values(registry_auth_sealed=bindparam("sealed"), updated_at=bindparam("updated_at")))
# Credentials a refused scale-up had set, put back to what they were: only where the column still holds the
# scale's (a hub key rotation, or a later change, that rewrote them meanwhile is not undone).
RESTORE_REGISTRY_AUTH = (update(SERVICES).where(SERVICES.c.id == bindparam("service_id"),
                                                SERVICES.c.registry_auth_sealed.is_not_distinct_from(bindparam("set")))
                         .values(registry_auth_sealed=bindparam("sealed"), updated_at=bindparam("updated_at")))
# A service's secrets, sealed (a PATCH's secrets: set, replaced or cleared).
SET_SECRETS = (update(SERVICES).where(SERVICES.c.id == bindparam("service_id"))
               .values(secrets_sealed=bindparam("sealed"), updated_at=bindparam("updated_at")))
# A service's copies, to delete with it.
SERVICE_COPIES = select(ContainerRegistryModel.controller_id, ContainerRegistryModel.container_id).where(
    ContainerRegistryModel.service_id == bindparam("service_id"))
DELETE_SERVICE = delete(SERVICES).where(SERVICES.c.id == bindparam("service_id"))

DELETE_ROW = delete(REGISTRY).where(REGISTRY.c.id == bindparam("row_id"))


async def delete_row(db: Database, row_id: str) -> None:
    """Remove a registry row: its reservation ends; a container it held, if any, becomes an orphan that its
    controller removes on its next heartbeat, unless the caller removed it first."""
    async with db.session() as session:
        await session.execute(DELETE_ROW, {"row_id": row_id})
