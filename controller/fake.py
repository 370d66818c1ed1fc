"""An in-memory ``Runtime`` for unit tests of the layers above Docker.

It keeps the rules the real runtime enforces (only containers labelled for
this controller are visible, names are unique, unknown images are refused)
so tests of the HTTP layer and of ContainerService mean something; every
behaviour is also tested against the real engine in ``tests/controller``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import tarfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from controller.errors import (
    Conflict,
    DockerError,
    DockerUnavailable,
    ImageInUse,
    ImageNotFound,
    ImagePullFailed,
    NameConflict,
    NotFound,
    PathConflict,
)
from controller.gpu import label_gpu_ids
from controller.runtime import MODE_DIR, HostInfo, PathStat
from controller.schemas import ContainerStats, ImageDetail, ImageSummary
from controller.spec import ContainerSpec
from mmanager.wire import (
    LABEL_ATTEMPT,
    LABEL_CONTROLLER,
    LABEL_EPOCH,
    LABEL_JOB,
    LABEL_MANAGED,
    LABEL_SERVICE,
    ContainerInfo,
    HeldImage,
    ImagePulled,
    ImagePullProgress,
)

GB = 1024**3


@dataclass
class FakeContainer:
    id: str
    spec: ContainerSpec
    status: str = "created"
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # Docker's State.StartedAt of the last start, and how many times it was restarted.
    started_at: str = "0001-01-01T00:00:00Z"
    restarts: int = 0
    host_ports: dict[str, int | None] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    # Docker's State.ExitCode and FinishedAt of the last exit.
    exit_code: int = 0
    finished_at: str = "0001-01-01T00:00:00Z"
    # Set while it is not running: what ``wait`` waits for.
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.spec.name or f"fake-{self.id[:8]}"


class FakeRuntime:
    def __init__(self, server_id: str, images: tuple[str, ...] = ("mmanager/example-model:latest",)) -> None:
        self.server_id = server_id
        self.images = {name: "sha256:" + hashlib.sha256(name.encode()).hexdigest() for name in images}
        self.containers: dict[str, FakeContainer] = {}
        self.docker_up = True
        # Images whose containers fail on start, like a bad entrypoint would.
        self.failing_images: set[str] = set()
        # Seconds each create takes, to let concurrent requests overlap.
        self.create_delay = 0.0
        self.creates = 0
        # Paths stat'ed, so tests can check that a copy's checks look only where something may be.
        self.stats_made = 0
        self.pulls_done = 0
        self._ports = itertools.count(40000)
        # The host's CPU time as stats report it: a second more at each read, the containers idle.
        self._host_cpu = itertools.count(10**9, 10**9)

    def add_container(self, spec: ContainerSpec, status: str = "running") -> FakeContainer:
        """Put a container in place behind the API's back (one from before a restart, or a foreign one)."""
        container = FakeContainer(id=uuid.uuid4().hex * 2, spec=spec, status=status)
        if status == "running":
            container.started_at = container.created
        else:
            container.ended.set()
        self.containers[container.id] = container
        return container

    # -- plumbing --------------------------------------------------------

    def _up(self) -> None:
        if not self.docker_up:
            raise DockerUnavailable("Docker daemon unreachable (fake)")

    def _visible(self, container: FakeContainer) -> bool:
        labels = container.spec.labels
        return labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_CONTROLLER) == self.server_id

    def _find(self, container_id: str) -> FakeContainer:
        self._up()
        for container in self.containers.values():
            named = container_id in (container.id, container.name)
            prefix = len(container_id) >= 4 and container.id.startswith(container_id)
            if (named or prefix) and self._visible(container):
                return container
        raise NotFound(f"no container {container_id!r} managed by this controller")

    def _info(self, container: FakeContainer) -> ContainerInfo:
        labels = container.spec.labels
        epoch = labels.get(LABEL_EPOCH)
        return ContainerInfo(
            id=container.id,
            container_id=container.id,
            name=container.name,
            image=container.spec.image,
            status=container.status,
            state={
                "Status": container.status,
                "Running": container.status == "running",
                "StartedAt": container.started_at,
                "FinishedAt": container.finished_at,
                "ExitCode": container.exit_code,
            },
            created=container.created,
            ports=dict(container.host_ports) or dict.fromkeys(container.spec.ports),
            labels=labels,
            service_id=labels.get(LABEL_SERVICE) or None,
            epoch=int(epoch) if epoch is not None else None,
            job_id=labels.get(LABEL_JOB) or None,
            attempt_id=labels.get(LABEL_ATTEMPT) or None,
            memory_limit=container.spec.mem_limit,
            cpu_limit=container.spec.nano_cpus / 1e9 if container.spec.nano_cpus else None,
            gpu_device_ids=label_gpu_ids(labels),
        )

    # -- host ------------------------------------------------------------

    async def ping(self) -> bool:
        return self.docker_up

    async def host_info(self) -> HostInfo:
        self._up()
        return HostInfo(cpu_cores=4, memory_total=8 * GB)

    # -- containers ------------------------------------------------------

    async def list_containers(
        self, *, all: bool, labels: dict[str, str] | None = None, detailed: bool = True
    ) -> list[ContainerInfo]:
        self._up()
        wanted = labels or {}
        return [
            self._info(c)
            for c in self.containers.values()
            if self._visible(c) and (all or c.status == "running") and _has_labels(wanted, c.spec.labels)
        ]

    async def get_container(self, container_id: str) -> ContainerInfo:
        return self._info(self._find(container_id))

    async def create_container(self, spec: ContainerSpec) -> str:
        self._up()
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        if spec.image not in self.images:
            raise ImageNotFound(
                f"image {spec.image!r} is not present on this host; pull it first", {"image": spec.image}
            )
        if spec.name and any(c.name == spec.name for c in self.containers.values()):
            raise NameConflict(f"a container named {spec.name!r} already exists")
        self.creates += 1
        return self.add_container(spec, status="created").id

    async def start_created(self, container_id: str) -> ContainerInfo | None:
        container = self._find(container_id)
        self._start(container)
        return self._info(container)

    async def start(self, container_id: str) -> None:
        self._start(self._find(container_id))

    def _start(self, container: FakeContainer) -> None:
        if container.spec.image in self.failing_images:
            container.status = "exited"
            raise DockerError("OCI runtime create failed (fake)")
        container.status = "running"
        container.ended.clear()
        container.started_at = datetime.now(UTC).isoformat()
        container.host_ports = {key: port or next(self._ports) for key, port in container.spec.ports.items()}
        container.log_lines.append(f"{container.name} started")

    async def stop(self, container_id: str, timeout: int) -> None:
        container = self._find(container_id)
        if container.status == "running":
            # SIGTERM's exit, as a shell that traps nothing would have it.
            self.exit(container.id, 143)
        container.host_ports = {}

    def exit(self, container_id: str, code: int = 0, output: str = "") -> None:
        """The container's process ends by itself with ``code``, having printed ``output``."""
        container = self._find(container_id)
        container.log_lines.extend(output.splitlines())
        container.status = "exited"
        container.exit_code = code
        container.finished_at = datetime.now(UTC).isoformat()
        container.ended.set()

    async def wait(self, container_id: str, timeout: float) -> int | None:
        container = self._find(container_id)
        if container.status != "running":
            return container.exit_code
        try:
            await asyncio.wait_for(container.ended.wait(), timeout)
        except TimeoutError:
            return None
        if container.id not in self.containers:
            raise NotFound(f"no container {container_id!r} managed by this controller")
        return container.exit_code

    async def restart(self, container_id: str, timeout: int) -> None:
        await self.stop(container_id, timeout)
        await self.start(container_id)
        self._find(container_id).restarts += 1

    async def network_address(self, container_id: str) -> str | None:
        self._find(container_id)
        # No network to reach: the fake's ports are not served by anything.
        return None

    async def remove(self, container_id: str, force: bool) -> None:
        container = self._find(container_id)
        if container.status == "running" and not force:
            raise Conflict(f"container {container.name} is running: stop it first or force")
        del self.containers[container.id]
        container.ended.set()

    async def logs(self, container_id: str, lines: int) -> str:
        container = self._find(container_id)
        return "".join(line + "\n" for line in container.log_lines[-lines:] if lines)

    async def log_bytes(self, container_id: str, lines: int) -> bytes:
        # Lone surrogates stand for bytes that are not UTF-8 (a test's "\udcff" is the byte 0xff).
        return (await self.logs(container_id, lines)).encode("utf-8", "surrogateescape")

    async def follow_logs(self, container_id: str, lines: int) -> AsyncIterator[bytes]:
        container = self._find(container_id)

        async def chunks() -> AsyncIterator[bytes]:
            for line in container.log_lines[-lines:] if lines else []:
                yield (line + "\n").encode()

        return chunks()

    async def stats(self, container_id: str, *, one_shot: bool = False) -> ContainerStats:
        container = self._find(container_id)
        return ContainerStats(
            container_id=container.id,
            name=container.name,
            status=container.status,
            started_at=container.started_at,
            system_cpu_usage_ns=next(self._host_cpu),
            memory_limit=container.spec.mem_limit or 8 * GB,
        )

    async def put_archive(self, container_id: str, data: bytes) -> None:
        container = self._find(container_id)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = tar.getmembers()
            # As Docker with noOverwriteDirNonDir: refused whole, before anything is written.
            for member in members:
                path = "/" + member.name
                there = _fake_stat(container.files, path)
                if there is not None and there.is_dir != member.isdir():
                    raise PathConflict(f"cannot overwrite {path} (fake)")
            for member in members:
                if member.isreg():
                    extracted = tar.extractfile(member)
                    container.files["/" + member.name] = extracted.read() if extracted else b""

    async def stat_path(self, container_id: str, path: str) -> PathStat | None:
        return (await self.stat_paths(container_id, [path]))[0]

    async def stat_paths(self, container_id: str, paths: list[str]) -> list[PathStat | None]:
        files = self._find(container_id).files
        self.stats_made += len(paths)
        return [_fake_stat(files, path) for path in paths]

    async def exec(self, container_id: str, argv: list[str]) -> tuple[int, str]:
        container = self._find(container_id)
        if container.status != "running":
            raise Conflict(f"container {container.name} is not running")
        if argv[:2] != ["rm", "-rf"]:
            return 127, f"{argv[0]}: not found (fake)"
        for path in argv[2:]:
            for name in [n for n in container.files if n == path or n.startswith(path.rstrip("/") + "/")]:
                del container.files[name]
        return 0, ""

    # -- images ----------------------------------------------------------

    async def list_images(self) -> list[ImageSummary]:
        self._up()
        return [
            ImageSummary(repository=name.rpartition(":")[0], tag=name.rpartition(":")[2], id=image_id, size=1024)
            for name, image_id in self.images.items()
        ]

    async def inspect_image(self, name: str) -> ImageDetail:
        self._up()
        full = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        if full not in self.images:
            return ImageDetail(exists=False, name=name)
        return ImageDetail(exists=True, name=name, id=self.images[full], tags=[full], size=1024)

    async def remove_image(self, name: str, force: bool) -> list[dict[str, str]]:
        detail = await self.inspect_image(name)
        if not detail.exists:
            raise ImageNotFound(f"no image {name!r} on this host")
        full = detail.tags[0]
        if not force and any(c.spec.image == full for c in self.containers.values()):
            raise ImageInUse(f"image {name} is used by a container")
        del self.images[full]
        self.pulls_done += 1
        return [{"Untagged": full}, {"Deleted": detail.id or ""}]

    async def prune_images(self) -> tuple[list[str], int]:
        self._up()
        self.pulls_done += 1
        return [], 0

    async def pull_image(self, name: str, auth: dict[str, Any] | None) -> ImageDetail:
        self._up()
        raise ImagePullFailed(f"pulling {name!r} failed: no registry reachable (fake)", {"image": name})

    async def pull_missing(self, image: str, auth: dict[str, str] | None = None) -> ImagePulled:
        # Never reached: the fake's create refuses a missing image as ImageNotFound, not ImageNotPresent.
        self._up()
        raise ImagePullFailed(f"pulling {image!r} failed: no registry reachable (fake)", {"image": image})

    def pull_progress(self) -> list[ImagePullProgress]:
        return []  # the fake never pulls

    async def held_images(self) -> list[HeldImage]:
        self._up()
        return [HeldImage(id=image_id, tags=[name], size=1024) for name, image_id in self.images.items()]

    async def close(self) -> None:
        return None


def _has_labels(wanted: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def _fake_stat(files: dict[str, bytes], path: str) -> PathStat | None:
    """A fake container holds files only: a folder is any path a file lies under."""
    if path in files:
        return PathStat(mode=0o644, size=len(files[path]))
    prefix = path.rstrip("/") + "/"
    if any(name.startswith(prefix) for name in files):
        return PathStat(mode=MODE_DIR | 0o755)
    return None
