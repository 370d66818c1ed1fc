"""ORM classes. Every table the hub owns is declared here and created by the
alembic migrations in ``migrations/versions``; a test keeps the two in step.

Timestamps are stored as timezone-aware UTC. SQLite forgets the zone, so
``UTCDateTime`` puts it back on the way out: code never sees a naive datetime.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        # Stored as UTC: SQLite keeps no offset, so 12:01+02:00 and 10:01Z must be written alike.
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}

    if TYPE_CHECKING:
        # Every model here is mapped to a Table of its own (SQLAlchemy types it as any FromClause, which
        # might be a join or a subquery), so the Core statements the services build on it type-check.
        __table__: ClassVar[Table]


class UserModel(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set while the user is disabled: their tokens are refused (USER_DISABLED); their services keep running.
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)
    # Their quotas (hub.services.quotas); null: the hub-wide default (MMANAGER_MAX_SERVICES_PER_USER, ...).
    max_services: Mapped[int | None] = mapped_column(Integer, default=None)
    max_gpus: Mapped[int | None] = mapped_column(Integer, default=None)
    max_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class ApiTokenModel(Base):
    """A user's bearer token. Only its SHA-256 is stored: tokens carry 256 bits
    of randomness, so a fast hash is enough and lookups stay one index probe."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    # What its owner calls it ("laptop", "ci"); null for a token made before tokens had names.
    name: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # A hint, written at most once a minute per token (hub.services.users.UserAuth), not an audit trail.
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[UserModel] = relationship(lazy="joined")


class ControllerModel(Base):
    __tablename__ = "mmanager_controllers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    server_type: Mapped[str] = mapped_column(String(16), default="cpu")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    priority: Mapped[int] = mapped_column(Integer, default=1)
    weight: Mapped[int] = mapped_column(Integer, default=100)
    # healthy | unhealthy | unknown; "draining" is derived from the flag above.
    status: Mapped[str] = mapped_column(String(16), default="unknown")
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    # The last heartbeat the controller pushed itself; controllers that never push are polled.
    last_push_at: Mapped[datetime | None] = mapped_column(default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    # What the controller reports (its MAX_CONTAINERS), and the admin's cap below it (null: none); placement
    # uses the smaller (``effective_max_containers``).
    max_containers: Mapped[int] = mapped_column(Integer, default=100)
    max_containers_cap: Mapped[int | None] = mapped_column(Integer, default=None)
    # Listed in MMANAGER_CONTROLLERS (set by the start's sync and by reloads): a row the file listed and no
    # longer does is the file's to delete, whichever replica, at whichever start or reload, sees it gone.
    from_file: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    containers_running: Mapped[int] = mapped_column(Integer, default=0)
    load_percentage: Mapped[float] = mapped_column(Float, default=0.0)
    memory_usage_percent: Mapped[float] = mapped_column(Float, default=0.0)
    cpu_cores: Mapped[float] = mapped_column(Float, default=0.0)
    memory_total_gb: Mapped[float] = mapped_column(Float, default=0.0)
    memory_available_gb: Mapped[float] = mapped_column(Float, default=0.0)
    gpus: Mapped[list[Any]] = mapped_column(default=list)
    health_data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ServiceModel(Base):
    __tablename__ = "model_services"
    __table_args__ = (UniqueConstraint("owner_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    repo: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column()
    version: Mapped[int] = mapped_column(Integer, default=1)
    desired_state: Mapped[str] = mapped_column(String(16), default="running")
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    status_message: Mapped[str | None] = mapped_column(Text, default=None)
    controller_id: Mapped[str | None] = mapped_column(String(128), default=None, index=True)
    container_id: Mapped[str | None] = mapped_column(String(128), default=None)
    epoch: Mapped[int] = mapped_column(Integer, default=1)
    endpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    gpu_devices: Mapped[list[Any]] = mapped_column(default=list)
    health: Mapped[str] = mapped_column(String(16), default="unknown")
    # Why its primary copy is unhealthy (a golden-inference probe's wrong answer, the last failed check).
    health_detail: Mapped[str | None] = mapped_column(Text, default=None)
    # The copies it should run (its spec's ``replicas``); controller_id, container_id, endpoint and health
    # above are its primary copy's, and ``epoch`` the last epoch any of its copies was given.
    replicas: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The spec's registry_auth, sealed (hub.sealing): opened only for a controller's create, never shown.
    registry_auth_sealed: Mapped[str | None] = mapped_column(Text, default=None)
    # The spec's secrets, sealed (hub.services.secrets): opened only for a controller's create, never shown.
    secrets_sealed: Mapped[str | None] = mapped_column(Text, default=None)

    owner: Mapped[UserModel] = relationship(lazy="joined")


class ContainerRegistryModel(Base):
    """Where each service's container runs. A row exists from the moment a
    controller is chosen (status ``creating``) so that concurrent placements
    count it, and goes away when the container is removed."""

    __tablename__ = "container_registry"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    service_id: Mapped[str] = mapped_column(
        ForeignKey("model_services.id", ondelete="CASCADE"), index=True
    )
    controller_id: Mapped[str] = mapped_column(String(128), index=True)
    container_id: Mapped[str | None] = mapped_column(String(128), default=None)
    container_name: Mapped[str] = mapped_column(String(255))
    image: Mapped[str] = mapped_column(String(512))
    # creating | running | exited | ... (Docker's state) | stale: superseded by a newer epoch,
    # to be removed by its controller; the row goes once the controller no longer reports it.
    status: Mapped[str] = mapped_column(String(16), default="creating", index=True)
    epoch: Mapped[int] = mapped_column(Integer, default=1)
    health: Mapped[str] = mapped_column(String(16), default="unknown", server_default="unknown")
    health_restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Why the copy is unhealthy, as its controller says; null when healthy or unknown.
    health_detail: Mapped[str | None] = mapped_column(Text, default=None)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_limit: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_devices: Mapped[list[Any]] = mapped_column(default=list)
    # One of the service's replicas: set when its create settled (a row without it that is not superseded
    # is a create an interrupted operation began); its status leaves it when superseded.
    serving: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Where the copy answers (host and published ports), once it runs.
    endpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OperationModel(Base):
    """One lifecycle call. Rows outlive their service (no foreign key) so the
    history of a deleted or never-created service can still be read."""

    __tablename__ = "container_operations"
    __table_args__ = (Index("ix_container_operations_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    service_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    controller_id: Mapped[str | None] = mapped_column(String(128), default=None, index=True)
    container_id: Mapped[str | None] = mapped_column(String(128), default=None)
    operation: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    actor: Mapped[str] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The hub replica that runs it: a running operation whose replica stopped is recovered.
    hub_replica: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # A batch job's state change (hub.services.jobs): its job; service_id is then null.
    job_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)


class DeploymentHistoryModel(Base):
    __tablename__ = "service_deployment_history"
    __table_args__ = (UniqueConstraint("service_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service_id: Mapped[str] = mapped_column(
        ForeignKey("model_services.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column()
    image: Mapped[str] = mapped_column(String(512))
    reason: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class HubReplicaModel(Base):
    """Each running hub process, refreshed every few seconds; the leader runs the loops."""

    __tablename__ = "hub_replicas"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    is_leader: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DeletedControllerModel(Base):
    """A controller deleted (by ``DELETE /api/admin/controllers/{id}`` or a reload): its heartbeats no longer
    register it again. Gone when an admin registers it (``POST``) or ``MMANAGER_CONTROLLERS`` lists it."""

    __tablename__ = "deleted_controllers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)


class ControllerKeyModel(Base):
    """A controller's own heartbeat key. Only its SHA-256 is stored (keys carry 256 bits of
    randomness); at most two are active per controller, so a key can be rotated without a gap."""

    __tablename__ = "controller_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    controller_id: Mapped[str] = mapped_column(
        ForeignKey("mmanager_controllers.id", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditModel(Base):
    """Append-only: every mutating call and every refusal, on the hub and (shipped with their
    heartbeats) on the controllers. The migration adds triggers that refuse UPDATE and DELETE."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    # Where it happened: "hub", or "controller:<id>" for what a controller refused itself.
    source: Mapped[str] = mapped_column(String(160), default="hub")
    # Who: a username, "controller:<id>", or "anonymous" (no valid credentials).
    actor: Mapped[str] = mapped_column(String(160), index=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    # What it acted on (a service, controller or container id from the path), when any.
    target: Mapped[str | None] = mapped_column(String(160), default=None)
    status_code: Mapped[int] = mapped_column(Integer)
    # ok | refused (4xx) | error (5xx)
    result: Mapped[str] = mapped_column(String(16), index=True)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    remote: Mapped[str | None] = mapped_column(String(64), default=None)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class AlertModel(Base):
    """A usage threshold crossed (hub.services.monitoring): open while ``resolved_at`` is null. One
    open alert at most per (kind, controller, container); disk alerts have no container."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_started_at", "started_at"),
        # At most one open alert per key in the database itself: two replicas flushing at the same instant
        # cannot both open it (hub.services.monitoring inserts with ON CONFLICT DO NOTHING).
        Index("uq_alerts_open", "kind", "controller_id", func.coalesce(text("container_id"), ""), unique=True,
              postgresql_where=text("resolved_at IS NULL"), sqlite_where=text("resolved_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # cpu | memory | disk
    kind: Mapped[str] = mapped_column(String(16))
    controller_id: Mapped[str] = mapped_column(String(128), index=True)
    # No foreign key: an alert outlives its service, like the operation history.
    service_id: Mapped[str | None] = mapped_column(String(32), default=None, index=True)
    container_id: Mapped[str | None] = mapped_column(String(128), default=None)
    container_name: Mapped[str | None] = mapped_column(String(255), default=None)
    # The reading that opened it (percent), and the threshold it crossed.
    value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None, index=True)


class ServiceMetricModel(Base):
    """A service's resource use and gateway traffic, one row per service per MMANAGER_METRICS_RESOLUTION
    (``at`` is the bucket's start), kept for MMANAGER_METRICS_RETENTION. Network and block I/O are the
    container's counters at the bucket's last sample (they restart from zero with a new container). The
    heartbeat flusher writes the resource columns (``samples`` 0: a row the traffic recorder made, with
    no sample), the leader's traffic recorder the traffic ones; neither overwrites the other's."""

    __tablename__ = "service_metrics"

    # No foreign key: a row for a service deleted meanwhile must not fail the write of every other row
    # (rows of deleted services are unreachable through the API and go with the retention).
    service_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    at: Mapped[datetime] = mapped_column(primary_key=True, index=True)
    samples: Mapped[int] = mapped_column(Integer)
    cpu_percent_avg: Mapped[float] = mapped_column(Float)
    cpu_percent_max: Mapped[float] = mapped_column(Float)
    memory_bytes_avg: Mapped[int] = mapped_column(BigInteger)
    memory_bytes_max: Mapped[int] = mapped_column(BigInteger)
    memory_percent_max: Mapped[float] = mapped_column(Float)
    network_rx_bytes: Mapped[int] = mapped_column(BigInteger)
    network_tx_bytes: Mapped[int] = mapped_column(BigInteger)
    block_read_bytes: Mapped[int] = mapped_column(BigInteger)
    block_write_bytes: Mapped[int] = mapped_column(BigInteger)
    # The peak VRAM of the service's containers and their GPUs' mean utilisation; None without a GPU.
    gpu_memory_bytes_max: Mapped[int | None] = mapped_column(BigInteger, default=None)
    gpu_util_percent_avg: Mapped[float | None] = mapped_column(Float, default=None)
    # Requests the gateways counted in the bucket, of which 5xx; the latency histogram's counts in it,
    # cumulative by upper bound ("0.1", "+Inf"). None in rows older than the traffic history.
    requests: Mapped[int | None] = mapped_column(BigInteger, default=None)
    errors_5xx: Mapped[int | None] = mapped_column(BigInteger, default=None)
    latency_buckets: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)


class ServiceKeyModel(Base):
    """A key that opens a private service's gateway route. Only its SHA-256 is kept (the key itself is a
    random 256-bit token shown once), so the hash is what the gateway compares: no gateway holds a key."""

    __tablename__ = "service_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    service_id: Mapped[str] = mapped_column(ForeignKey("model_services.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(64), default=None)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GatewayModel(Base):
    """A gateway (``mmanager gateway serve``) as it last reported itself: where it answers and which
    version of the routing table it has applied."""

    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    # Where Prometheus scrapes it (HAProxy's exporter at /metrics, the latency histograms at /metrics/latency).
    metrics_url: Mapped[str | None] = mapped_column(String(512), default=None)
    version: Mapped[int] = mapped_column(Integer, default=0)
    # Requests it has routed to each service since it started (service id -> count): what idle stop reads.
    traffic: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class GatewayRoutesModel(Base):
    """The routing table the gateways apply: one row (id 1), written by the leading hub replica only,
    its ``version`` raised on each change."""

    __tablename__ = "gateway_routes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelTypeModel(Base):
    """A model type of the catalog (``GET /api/models``): what a service created with ``"model": name`` gets
    for each spec field its create leaves out. ``spec`` holds the other service spec fields it fills in (ports,
    health_check, env, ...) under ServiceSpec's names. Services keep a copy, never a reference: changing or
    deleting a type leaves the services made from it as they are."""

    __tablename__ = "model_types"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    image: Mapped[str] = mapped_column(String(512))
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    replicas: Mapped[int] = mapped_column(Integer, default=1)
    probe: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelFileModel(Base):
    """A file of the model-file store (``hub.services.model_files``): its bytes live in ``MMANAGER_MODEL_STORE``
    under their sha256, and a row exists only once they are there, complete and checked. Services name it in
    their spec's ``models`` by digest."""

    __tablename__ = "model_files"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    uploaded_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PipelineModel(Base):
    """A DAG of jobs submitted as one spec (``hub.services.jobs.pipelines``): its steps are rows of ``jobs``
    that name it. Its status follows its steps'."""

    __tablename__ = "pipelines"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column()
    # pending | running | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    owner: Mapped[UserModel] = relationship(lazy="joined")


class JobModel(Base):
    """A batch job (``hub.services.jobs``): queued while ``pending``, run as attempts (``job_attempts``) on
    controllers. ``epoch`` is the number of its current attempt: only that attempt's end settles the job, and
    a controller's container of any other is fenced."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_queue", "status", "priority", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # The JobSpec as submitted (hub.job_schemas), without secrets.
    spec: Mapped[dict[str, Any]] = mapped_column()
    # pending | running | succeeded | failed | cancelled | timed_out
    status: Mapped[str] = mapped_column(String(16), default="pending")
    # Why it waits (the placement's verdict) or why it ended so.
    status_message: Mapped[str | None] = mapped_column(Text, default=None)
    # While pending: the placement's rejections, [{controller_id, reason}].
    wait_reasons: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts allowed after a failed or timed-out one.
    retries: Mapped[int] = mapped_column(Integer, default=0)
    timeout: Mapped[float | None] = mapped_column(Float, default=None)
    # Attempts made so far, and the number of the current (last) one.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    pipeline_id: Mapped[str | None] = mapped_column(
        ForeignKey("pipelines.id", ondelete="CASCADE"), default=None, index=True)
    step: Mapped[str | None] = mapped_column(String(63), default=None)
    # Job ids that must succeed before it may start (its inputs' producers, a pipeline's earlier steps).
    needs: Mapped[list[Any]] = mapped_column(default=list)
    # A retry's backoff: not started before this.
    not_before: Mapped[datetime | None] = mapped_column(default=None)
    # The current attempt's last JobProgress (mmanager.wire).
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    owner: Mapped[UserModel] = relationship(lazy="joined")


class JobAttemptModel(Base):
    """One run of a job on one controller. While ``starting`` or ``running`` it holds its resources on that
    controller as a registry row does (placement counts it)."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    controller_id: Mapped[str] = mapped_column(String(128), index=True)
    container_id: Mapped[str | None] = mapped_column(String(128), default=None)
    # starting | running | succeeded | failed | timed_out | cancelled | lost
    status: Mapped[str] = mapped_column(String(16), default="starting", index=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_limit: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_devices: Mapped[list[Any]] = mapped_column(default=list)
    # The attempt's log, kept in the artifact store once collected.
    log_digest: Mapped[str | None] = mapped_column(String(71), default=None)
    log_size: Mapped[int] = mapped_column(BigInteger, default=0)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    # The hub replica that started it.
    hub_replica: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ArtifactModel(Base):
    """A file in the artifact store (``hub.services.jobs.artifacts``), by sha256: an upload (a job's input)
    or what an attempt left under ``/outputs``. A row exists only once its bytes are stored and checked."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # An upload's file name, or an output's path under /outputs ('/'-separated).
    name: Mapped[str] = mapped_column(String(255))
    digest: Mapped[str] = mapped_column(String(71), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None, index=True)
    attempt_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
