"""Bodies of the controller API that only the controller defines.

The container lifecycle shapes both sides use live in ``mmanager.wire``; these
are the GeoML-Hub-facing extras (files, logs, stats, images). Requests are
read leniently like every wire model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from mmanager.wire import ContainerCreate, WireModel


class ContainerCreateRequest(ContainerCreate):
    """The create body as received: unknown fields are kept (``model_extra``), not dropped.

    Lenient reading must not turn ``"privileged": true`` into a quietly
    unprivileged container the caller believes is privileged, nor let a
    hostile field pass unnoticed: the spec policy looks at them and refuses
    the ones that reach the host. Other unknown fields stay harmless.
    """

    model_config = ConfigDict(extra="allow")


class FileCopy(WireModel):
    # Where the file lands, as docker cp decides (controller.copies): an existing folder takes it inside as
    # file_name; any other path is the file's own. is_directory (or a trailing slash) says "a folder" outright.
    container_path: str
    content_base64: str
    file_name: str | None = None
    is_directory: bool = False


class DirectoryCopy(WireModel):
    # The folder the archive's content becomes: merged into what is there, or replaced with remove_existing.
    container_path: str
    archive_base64: str
    remove_existing: bool = True


class CopyResult(WireModel):
    success: bool = True
    container_id: str
    path: str
    files: int
    size: int
    message: str = ""


class ContainerLogs(WireModel):
    container_id: str
    logs: str
    lines: int


class ContainerStats(WireModel):
    container_id: str
    name: str
    status: str
    read: str | None = None
    # Docker's State.StartedAt of the container's current run: its counters began then.
    started_at: str | None = None
    cpu_percent: float = 0.0
    # Cumulative counters, nanoseconds: the container's CPU time and the host's (all CPUs), as Docker read them.
    cpu_usage_ns: int = 0
    system_cpu_usage_ns: int = 0
    online_cpus: int = 0
    memory_usage: int = 0
    memory_limit: int = 0
    memory_percent: float = 0.0
    memory_usage_mb: float = 0.0
    memory_limit_mb: float = 0.0
    network_rx_bytes: int = 0
    network_tx_bytes: int = 0
    block_read_bytes: int = 0
    block_write_bytes: int = 0
    pids: int = 0


class ImagePull(WireModel):
    image: str = Field(min_length=1)
    # Registry credentials as Docker takes them: {"username", "password", "serveraddress"}.
    auth: dict[str, Any] | None = None


class ImageSummary(WireModel):
    repository: str
    tag: str
    id: str
    size: int
    created: str | None = None


class ImageList(WireModel):
    images: list[ImageSummary]


class ImageDetail(WireModel):
    exists: bool
    name: str
    id: str | None = None
    tags: list[str] = Field(default_factory=list)
    size: int | None = None
    created: str | None = None
    architecture: str | None = None
    os: str | None = None


class ImagePullResult(WireModel):
    status: Literal["success"] = "success"
    message: str
    image: ImageDetail


class ImageRemoved(WireModel):
    status: Literal["success"] = "success"
    message: str
    # Docker's own account: [{"Untagged": "…"}, {"Deleted": "sha256:…"}]
    deleted: list[dict[str, str]] = Field(default_factory=list)


class ImagesPruned(WireModel):
    status: Literal["success"] = "success"
    images_deleted: list[str] = Field(default_factory=list)
    space_reclaimed: int = 0
