"""The one object that talks to Docker.

``DockerRuntime`` wraps the ``docker`` SDK. Every SDK call is blocking, so
each runs on the runtime's own thread pool, never on the event loop. Followed
logs get a second pool of their own, ``MMANAGER_MAX_LOG_STREAMS`` threads for
as many streams at most: each open stream holds a thread blocked on its socket,
and in the shared pool 64 idle followers would leave none for listing or
creating containers (heartbeats would report Docker down). The runtime sees only containers labelled ``mmanager.managed=true``
and ``mmanager.controller=<SERVER_ID>``: any other id is answered as if it
did not exist. SDK exceptions are translated into ``controller.errors`` here,
so nothing above this module knows Docker's error types.

``controller.fake.FakeRuntime`` implements the same ``Runtime`` protocol in
memory for unit tests of the layers above.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

import docker
import docker.errors
import requests
import urllib3
from docker.models.containers import Container
from docker.types import DeviceRequest, LogConfig, Mount
from docker.utils import parse_repository_tag

from controller.config import ControllerSettings
from controller.errors import (
    Conflict,
    ControllerError,
    DockerError,
    DockerUnavailable,
    ImageInUse,
    ImageNotFound,
    ImageNotPresent,
    ImagePullFailed,
    InvalidContainerConfig,
    InvalidRequest,
    NameConflict,
    NotFound,
    PathConflict,
    TooManyLogStreams,
)
from controller.gpu import label_gpu_ids
from controller.pulls import Pulls, PullTracker
from controller.schemas import ContainerStats, ImageDetail, ImageSummary
from controller.spec import ContainerSpec
from mmanager.streams import ClosingStream, newest_bytes
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

# /health must answer quickly even when the daemon hangs.
PING_TIMEOUT = 3.0
_POOL_THREADS = 64
# Stats reads at once, on a thread pool and a Docker client (its connections) of their own, so a sampling round
# never takes the threads or connections other calls need. Docker's stats collector reads every subscribed container in one pass a second and a one-shot read
# waits for the next pass: reads in flight together share it, so a round costs about a second per STATS_READS
# containers (controller.stats).
STATS_READS = 64

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class HostInfo:
    cpu_cores: float
    memory_total: int
    # Docker's data root (DockerRootDir), where images, containers and volumes take disk.
    root_dir: str = ""


# Go's os.FileMode bits, as Docker's path stat reports them.
MODE_DIR = 1 << 31
MODE_SYMLINK = 1 << 27


@dataclass(frozen=True)
class PathStat:
    """What is at a path inside a container (the final component not followed, as ``lstat``)."""

    mode: int
    size: int = 0
    # A symbolic link's target, made absolute by Docker; "" for anything else.
    link_target: str = ""

    @property
    def is_dir(self) -> bool:
        return bool(self.mode & MODE_DIR)

    @property
    def is_link(self) -> bool:
        return bool(self.mode & MODE_SYMLINK)


class Runtime(Protocol):
    # Pulls, removals and prunes of images made through this runtime, counted up (the held set changed).
    pulls_done: int

    async def ping(self) -> bool: ...
    async def host_info(self) -> HostInfo: ...
    async def list_containers(
        self, *, all: bool, labels: dict[str, str] | None = None, detailed: bool = True
    ) -> list[ContainerInfo]: ...
    async def get_container(self, container_id: str) -> ContainerInfo: ...
    async def network_address(self, container_id: str) -> str | None: ...
    async def create_container(self, spec: ContainerSpec) -> str: ...
    async def start_created(self, container_id: str) -> ContainerInfo | None: ...
    async def start(self, container_id: str) -> None: ...
    async def stop(self, container_id: str, timeout: int) -> None: ...
    async def restart(self, container_id: str, timeout: int) -> None: ...
    async def remove(self, container_id: str, force: bool) -> None: ...
    async def wait(self, container_id: str, timeout: float) -> int | None: ...
    async def logs(self, container_id: str, lines: int) -> str: ...
    async def log_bytes(self, container_id: str, lines: int) -> bytes: ...
    async def follow_logs(self, container_id: str, lines: int) -> AsyncIterator[bytes]: ...
    async def stats(self, container_id: str, *, one_shot: bool = False) -> ContainerStats: ...
    async def put_archive(self, container_id: str, data: bytes) -> None: ...
    async def stat_path(self, container_id: str, path: str) -> PathStat | None: ...
    async def stat_paths(self, container_id: str, paths: list[str]) -> list[PathStat | None]: ...
    async def exec(self, container_id: str, argv: list[str]) -> tuple[int, str]: ...
    async def list_images(self) -> list[ImageSummary]: ...
    async def inspect_image(self, name: str) -> ImageDetail: ...
    async def remove_image(self, name: str, force: bool) -> list[dict[str, str]]: ...
    async def prune_images(self) -> tuple[list[str], int]: ...
    async def pull_image(self, name: str, auth: dict[str, Any] | None) -> ImageDetail: ...
    async def pull_missing(self, image: str, auth: dict[str, str] | None = None) -> ImagePulled: ...
    def pull_progress(self) -> list[ImagePullProgress]: ...
    async def held_images(self) -> list[HeldImage]: ...
    async def close(self) -> None: ...


class DockerRuntime:
    def __init__(self, settings: ControllerSettings) -> None:
        self._settings = settings
        self._server_id = settings.server_id
        self._client: docker.DockerClient | None = None
        # The stats reads' own client (controller.stats): its connection pool sized to the stats pool's threads.
        self._stats_client: docker.DockerClient | None = None
        self._connect_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=_POOL_THREADS, thread_name_prefix="docker")
        self._log_pool = ThreadPoolExecutor(max_workers=settings.max_log_streams, thread_name_prefix="docker-logs")
        # Job runs' waits (controller.jobs), one blocked thread each: apart, so they never starve the main pool.
        self._wait_pool = ThreadPoolExecutor(max_workers=settings.max_containers, thread_name_prefix="docker-wait")
        self._stats_pool = ThreadPoolExecutor(max_workers=STATS_READS, thread_name_prefix="docker-stats")
        self._log_streams = 0
        # The pulls of missing images running now, for GET /images/pulls.
        self._pulls = Pulls()
        # Image pulls, removals and prunes this runtime made: the heartbeats' image listing is taken again when it
        # moves (controller.inventory).
        self.pulls_done = 0
        # Rotated by Docker: a tenant's stdout never fills /var/lib/docker.
        self._log_config = LogConfig(
            type=LogConfig.types.JSON,
            config={"max-size": settings.log_max_size, "max-file": str(settings.log_max_files)},
        )

    # -- plumbing --------------------------------------------------------

    def _connect(self, *, stats: bool = False) -> docker.DockerClient:
        """The SDK client, made on first use so a controller can start before its daemon. Each client's
        connection pool holds as many connections as threads may use it at once: past that urllib3 opens
        throwaway ones and logs "Connection pool is full" (the main client serves the main, log and wait pools;
        the stats client the stats pool)."""
        with self._connect_lock:
            client = self._stats_client if stats else self._client
            if client is None:
                size = STATS_READS if stats else (
                    _POOL_THREADS + self._settings.max_log_streams + self._settings.max_containers)
                # Version negotiation happens here; bound it like a ping, then use the configured timeout.
                kwargs: dict[str, Any] = {"version": "auto", "timeout": PING_TIMEOUT, "max_pool_size": size}
                host = self._settings.docker_host
                client = docker.DockerClient(base_url=host, **kwargs) if host else docker.from_env(**kwargs)
                client.api.timeout = self._settings.docker_timeout  # type: ignore[assignment]  # seconds as a float: the stubs say int, requests takes either
                if stats:
                    self._stats_client = client
                else:
                    self._client = client
            return client

    async def _run(self, fn: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(pool or self._pool,
                                          partial(self._translated, fn, *args, stats=pool is self._stats_pool))
        except RuntimeError:
            # The pool is shut down: close() ran, the app is stopping. A 503, not a 500 with a traceback.
            raise DockerUnavailable("the controller is shutting down") from None
        return await future

    def _translated(self, fn: Callable[..., T], *args: Any, stats: bool = False) -> T:
        try:
            return fn(self._connect(stats=stats), *args)
        except ControllerError:
            raise
        except docker.errors.APIError as exc:
            raise _api_error(exc) from None
        except (requests.ConnectionError, requests.Timeout, docker.errors.DockerException) as exc:
            raise DockerUnavailable(f"Docker daemon unreachable: {exc}") from None

    def _managed(self, client: docker.DockerClient, container_id: str) -> Container:
        try:
            container = client.containers.get(container_id)
        except docker.errors.NotFound:
            container = None
        if container is None or not self._ours(container.labels):
            raise NotFound(f"no container {container_id!r} managed by this controller")
        return container

    def _ours(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_CONTROLLER) == self._server_id

    def _filters(self, labels: dict[str, str] | None) -> dict[str, str | list[str] | bool]:
        wanted = {LABEL_MANAGED: "true", LABEL_CONTROLLER: self._server_id, **(labels or {})}
        return {"label": [f"{key}={value}" for key, value in wanted.items()]}

    # -- host ------------------------------------------------------------

    async def ping(self) -> bool:
        def ping(client: docker.DockerClient) -> bool:
            return client.api.get(f"{client.api.base_url}/_ping", timeout=PING_TIMEOUT).ok

        try:
            return await self._run(ping)
        except DockerUnavailable:
            return False

    async def host_info(self) -> HostInfo:
        def info(client: docker.DockerClient) -> HostInfo:
            data = client.info()
            return HostInfo(
                cpu_cores=float(data.get("NCPU") or 0),
                memory_total=int(data.get("MemTotal") or 0),
                root_dir=str(data.get("DockerRootDir") or ""),
            )

        return await self._run(info)

    # -- containers ------------------------------------------------------

    async def list_containers(
        self, *, all: bool, labels: dict[str, str] | None = None, detailed: bool = True
    ) -> list[ContainerInfo]:
        """Managed containers; ``detailed=False`` skips the per-container inspect (no limits, no state)."""
        filters = self._filters(labels)

        def listing(client: docker.DockerClient) -> list[ContainerInfo]:
            if detailed:
                found = client.containers.list(all=all, filters=filters, ignore_removed=True)
                return [_container_info(c.attrs) for c in found]
            return [_summary_info(s) for s in client.api.containers(all=all, filters=filters)]

        return await self._run(listing)

    async def get_container(self, container_id: str) -> ContainerInfo:
        return await self._run(lambda client: _container_info(self._managed(client, container_id).attrs))

    async def network_address(self, container_id: str) -> str | None:
        """Where this host reaches the container's own (unpublished) ports.

        Its IP on its first network that has one; 127.0.0.1 with host
        networking; None when it has no address (``network_mode: none``, or
        not running).
        """

        def address(client: docker.DockerClient) -> str | None:
            attrs = self._managed(client, container_id).attrs
            if (attrs.get("HostConfig") or {}).get("NetworkMode") == "host":
                return "127.0.0.1"
            network_settings = attrs.get("NetworkSettings") or {}
            for network in (network_settings.get("Networks") or {}).values():
                if (network or {}).get("IPAddress"):
                    return network["IPAddress"]
            return network_settings.get("IPAddress") or None

        return await self._run(address)

    async def create_container(self, spec: ContainerSpec) -> str:
        """Create (not start) the container; on any failure nothing is left behind.

        One round trip: the SDK's ``containers.create`` inspects what it made, which nothing here reads. A
        missing image is Docker's answer to the create itself (404, raised as ImageNotPresent: the caller
        pulls with ``pull_missing`` and creates again), so a host that has the image pays nothing more. A
        reference no image can have (Docker's 400) is ImageNotFound, nothing to pull.
        """

        def create(client: docker.DockerClient) -> str:
            config, host = _create_kwargs(spec)
            host["log_config"] = self._log_config
            if not spec.gpu_device_ids:
                # On a server whose default runtime is NVIDIA's, a container without this sees every GPU.
                config["environment"].append("NVIDIA_VISIBLE_DEVICES=void")
            if spec.gpu_device_ids:
                if "nvidia" in (client.info().get("Runtimes") or {}):
                    host["device_requests"] = [DeviceRequest(device_ids=spec.gpu_device_ids, capabilities=[["gpu"]])]
                else:
                    # No NVIDIA runtime: say which GPUs were assigned, so placement works (and is testable) anywhere.
                    config["environment"].append(f"NVIDIA_VISIBLE_DEVICES={','.join(spec.gpu_device_ids)}")
            host_config = client.api.create_host_config(**host)  # for the API version the client negotiated
            # Every published port exposed too ("8000/tcp" as ("8000", "tcp")), as containers.create does.
            ports = [tuple(key.split("/", 1)) for key in sorted(host_config.get("PortBindings") or ())]
            missing = ImageNotFound(
                f"image {spec.image!r} is not present on this host; pull it first", {"image": spec.image}
            )
            try:
                container_id: str = client.api.create_container(
                    spec.image, host_config=host_config, ports=ports or None, **config)["Id"]
            except docker.errors.ImageNotFound:
                raise ImageNotPresent(missing.message, missing.details) from None
            except docker.errors.NotFound as exc:
                raise InvalidContainerConfig(str(exc.explanation)) from None
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise NameConflict(f"a container named {spec.name!r} already exists") from None
                if exc.status_code == 400 and "invalid reference format" in str(exc.explanation):
                    raise missing from None
                raise
            try:
                for network in spec.networks[1:]:
                    client.api.connect_container_to_network(container_id, network)
            except Exception as exc:
                client.api.remove_container(container_id, force=True)
                if isinstance(exc, docker.errors.NotFound):
                    raise InvalidContainerConfig(f"network not found: {exc.explanation}") from None
                raise
            return container_id

        return await self._run(create)

    async def pull_missing(self, image: str, auth: dict[str, str] | None = None) -> ImagePulled:
        """Pull ``image`` for a create that found it missing: off the event loop, within ``MMANAGER_PULL_TIMEOUT``,
        logged in with ``auth`` (Docker's ``auth_config``: username, password) when the registry needs it.

        The outcome (layers fetched, the image's size, seconds) is logged and returned. A registry that
        lacks the image or refuses it answers 404 (the caller's image, not this host's fault), an
        unreachable registry 502, a pull past the timeout 504: all IMAGE_PULL_FAILED, with the image and
        the registry's message in the details. A timed-out pull goes on in its pool thread until Docker
        ends it; the create has answered by then.
        """
        repository, tag = parse_repository_tag(image)
        started = time.monotonic()

        def failed(message: str, status: int) -> ImagePullFailed:
            return ImagePullFailed(f"pulling {image!r} failed: {message}", {"image": image, "registry": message},
                                   status_code=status)

        def pull(client: docker.DockerClient, tracker: PullTracker) -> tuple[int, int]:
            layers: set[str] = set()
            try:
                # tag None: the SDK pulls ":latest", as Docker's create would have looked up.
                for event in client.api.pull(repository, tag=tag, stream=True, decode=True, auth_config=auth):
                    if event.get("error"):
                        raise failed(str(event["error"]), 502)
                    tracker.event(event)
                    if event.get("status") == "Pull complete" and event.get("id"):
                        layers.add(str(event["id"]))
            except docker.errors.APIError as exc:
                raise failed(str(exc.explanation or exc), 404 if exc.status_code == 404 else 502) from None
            except requests.exceptions.ReadTimeout:
                # DOCKER_TIMEOUT seconds without one progress event: the registry stalls the pull.
                raise failed(f"no progress within {self._settings.docker_timeout:g} s", 504) from None
            size = int(client.api.inspect_image(image if tag else f"{image}:latest").get("Size") or 0)
            return len(layers), size

        timeout = self._settings.pull_timeout
        tracker = self._pulls.begin(image)
        try:
            layers, size = await asyncio.wait_for(self._run(pull, tracker), timeout)
        except TimeoutError:
            raise failed(f"no answer within {timeout:g} s (MMANAGER_PULL_TIMEOUT)", 504) from None
        finally:
            self._pulls.end(tracker)
        self.pulls_done += 1
        pulled = ImagePulled(image=image, layers=layers, bytes=size, seconds=round(time.monotonic() - started, 3))
        log.info("pulled image %s for a create: %d layers, %d bytes, %.1f s",
                 image, layers, size, pulled.seconds)
        return pulled

    def pull_progress(self) -> list[ImagePullProgress]:
        """The pulls of missing images running now, each as far as Docker has reported it."""
        return self._pulls.snapshot()

    async def start_created(self, container_id: str) -> ContainerInfo | None:
        """Start a container this controller itself just created or listed, and inspect it once started.

        The id comes from our own create (or a listing filtered on our labels), so no inspect before the
        start: the start and the inspect that reads its outcome (the ports Docker picked, the state) are
        the only round trips, on one pool thread. The inspect's labels are still checked, so nothing
        foreign is ever answered as ours. None when the start succeeded but the container is gone by the
        inspect (an ``auto_remove`` one that exited at once); a failed start raises as ``start`` does.
        """

        def start(client: docker.DockerClient) -> ContainerInfo | None:
            client.api.start(container_id)
            try:
                attrs = client.api.inspect_container(container_id)
            except docker.errors.NotFound:
                return None
            if not self._ours((attrs.get("Config") or {}).get("Labels")):
                raise NotFound(f"no container {container_id!r} managed by this controller")
            return _container_info(attrs)

        return await self._run(start)

    async def start(self, container_id: str) -> None:
        await self._run(lambda client: self._managed(client, container_id).start())

    async def stop(self, container_id: str, timeout: int) -> None:
        await self._run(lambda client: self._managed(client, container_id).stop(timeout=timeout))

    async def restart(self, container_id: str, timeout: int) -> None:
        await self._run(lambda client: self._managed(client, container_id).restart(timeout=timeout))

    async def remove(self, container_id: str, force: bool) -> None:
        await self._run(lambda client: self._managed(client, container_id).remove(force=force))

    async def wait(self, container_id: str, timeout: float) -> int | None:
        """The container's exit code once it is not running (at once if it is not), or None when it still
        runs after ``timeout`` seconds. On the wait pool: each wait holds a thread blocked on Docker."""

        def wait(client: docker.DockerClient) -> int | None:
            self._managed(client, container_id)
            try:
                result = client.api.wait(container_id, timeout=timeout)  # type: ignore[arg-type]  # requests takes a float
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
                # The read timing out is how "still running" looks (ConnectionError wraps urllib3's read timeout).
                if isinstance(exc, requests.exceptions.ReadTimeout) or "timed out" in str(exc).lower():
                    return None
                raise
            return int(result.get("StatusCode", -1))

        return await self._run(wait, pool=self._wait_pool)

    async def logs(self, container_id: str, lines: int) -> str:
        """The last ``lines`` lines, cut to their newest ``MMANAGER_MAX_LOG_BYTES``.

        Read as a stream and kept in a rolling buffer, so a tail of 100000 lines
        of 16 KiB each never sits in memory whole.
        """
        return (await self.log_bytes(container_id, lines)).decode("utf-8", errors="replace")

    async def log_bytes(self, container_id: str, lines: int) -> bytes:
        """``logs`` as the container wrote them (a job's kept log: not decoded)."""
        limit = self._settings.max_log_bytes

        def logs(client: docker.DockerClient) -> bytes:
            stream = self._managed(client, container_id).logs(stdout=True, stderr=True, stream=True, follow=False, tail=lines)
            try:
                return newest_bytes(stream, limit)
            finally:
                with contextlib.suppress(OSError, docker.errors.DockerException):
                    stream.close()

        return await self._run(logs)

    async def follow_logs(self, container_id: str, lines: int) -> AsyncIterator[bytes]:
        """Open the stream now (so a bad id fails before any byte is sent); iterate it later.

        At most ``MMANAGER_MAX_LOG_STREAMS`` are open at once (429
        TOO_MANY_LOG_STREAMS beyond), all on the log pool. The stream ends when
        the container stops; closing it (the client went away) shuts the socket
        down, which frees the thread blocked reading it, and gives the slot back.
        """
        limit = self._settings.max_log_streams
        if self._log_streams >= limit:
            raise TooManyLogStreams(
                f"{limit} followed logs are open on this controller already; retry when one has ended",
                {"max_log_streams": limit},
            )
        self._log_streams += 1
        try:
            stream = await self._run(
                lambda client: self._managed(client, container_id).logs(
                    stdout=True, stderr=True, stream=True, follow=True, tail=lines
                ),
                pool=self._log_pool,
            )
        except BaseException:
            self._log_streams -= 1
            raise
        loop = asyncio.get_running_loop()

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                try:
                    chunk = await loop.run_in_executor(self._log_pool, next, stream, None)
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError, RuntimeError):
                    # The socket was closed under the reader, or the pool shut down: the stream is over either way.
                    return
                if chunk is None:
                    return
                yield chunk

        async def close() -> None:
            with contextlib.suppress(OSError, docker.errors.DockerException):
                stream.close()

        return ClosingStream(chunks(), close).on_close(self._log_stream_closed)

    def _log_stream_closed(self) -> None:
        self._log_streams -= 1

    async def stats(self, container_id: str, *, one_shot: bool = False) -> ContainerStats:
        """One stats reading. ``one_shot``: Docker reads once (milliseconds) and ``cpu_percent`` is 0, the
        caller computing it from the cumulative counters against its previous reading (controller.stats);
        else Docker reads twice about a second apart and ``cpu_percent`` is ``docker stats``'s figure. An
        engine older than API 1.41 has no one-shot reads: it is read twice, the counters the same.

        A container removed while it is read is NotFound, whichever way Docker says it: an empty body (it
        went during the read), 404, or 409 (its removal under way). ``started_at`` is the container's
        ``State.StartedAt`` from the inspect that finds it: a start since a caller's previous reading (its
        counters began again) shows there even where the new CPU counter is above the old.

        One-shot reads run on the stats pool (the sampler's rounds); Docker's two readings, a second each,
        on the main pool, so that ``GET /containers/{id}/stats`` never queues behind a round."""

        def stats(client: docker.DockerClient) -> ContainerStats:
            container = self._managed(client, container_id)
            gone = NotFound(f"container {container_id!r} went away while its stats were read")
            once = one_shot and not docker.utils.version_lt(client.api.api_version, "1.41")
            try:
                sample = container.stats(stream=False, one_shot=True) if once else container.stats(stream=False)
            except docker.errors.APIError as exc:
                if exc.status_code in (404, 409):
                    raise gone from None
                raise
            except ValueError:
                # requests' JSONDecodeError: Docker closed the answer without a body, the container removed.
                raise gone from None
            # Not streamed: one sample, as a dict; a container got by id has its id and name.
            assert isinstance(sample, dict) and container.id is not None and container.name is not None
            started = (container.attrs.get("State") or {}).get("StartedAt")
            return _summarize_stats(container.id, container.name, container.status, sample, started)

        return await self._run(stats, pool=self._stats_pool if one_shot else None)

    async def put_archive(self, container_id: str, data: bytes) -> None:
        """Unpack ``data`` at ``/``, never letting a file take a folder's place or a folder a file's.

        The SDK's ``put_archive`` cannot ask for ``noOverwriteDirNonDir`` (``docker cp`` always does), so
        the request is made here; without it Docker deletes a folder, and all in it, that a file entry
        names. (Docker still turns a file of the image's own layers into a folder when an entry needs one
        there: ``controller.copies`` looks first.)
        """

        def put(client: docker.DockerClient) -> None:
            container = self._managed(client, container_id)
            try:
                _archive_call(client, "PUT", container, {"path": "/", "noOverwriteDirNonDir": "true"}, data)
            except docker.errors.APIError as exc:
                message = str(exc.explanation or exc)
                if "cannot overwrite" in message or "not a directory" in message:
                    raise PathConflict(f"the copy would replace a folder with a file or a file with a folder: "
                                       f"{message}") from None
                raise

        await self._run(put)

    async def stat_path(self, container_id: str, path: str) -> PathStat | None:
        """What is at ``path`` (None: nothing), without exec: Docker's ``HEAD /containers/{id}/archive``, which
        answers for a stopped container too."""
        return (await self.stat_paths(container_id, [path]))[0]

    async def stat_paths(self, container_id: str, paths: list[str]) -> list[PathStat | None]:
        """``stat_path`` of each of ``paths``, in order: the container looked up once, the stats side by side."""
        container = await self._run(self._managed, container_id)
        return list(await asyncio.gather(*(self._run(_stat, container, path) for path in paths)))

    async def exec(self, container_id: str, argv: list[str]) -> tuple[int, str]:
        def run(client: docker.DockerClient) -> tuple[int, str]:
            result = self._managed(client, container_id).exec_run(argv)
            exit_code, output = result.exit_code, result.output
            # Neither streamed nor detached: Docker answers the exit code and the whole output at once.
            assert exit_code is not None and isinstance(output, bytes)
            return exit_code, output.decode("utf-8", errors="replace")

        return await self._run(run)

    # -- images ----------------------------------------------------------

    async def list_images(self) -> list[ImageSummary]:
        def listing(client: docker.DockerClient) -> list[ImageSummary]:
            images = []
            for image in client.api.images():
                created = _timestamp(image.get("Created"))
                for ref in image.get("RepoTags") or ["<none>:<none>"]:
                    repository, _, tag = ref.rpartition(":")
                    images.append(
                        ImageSummary(
                            repository=repository, tag=tag, id=image["Id"], size=image.get("Size", 0), created=created
                        )
                    )
            return images

        return await self._run(listing)

    async def held_images(self) -> list[HeldImage]:
        """Every image on the host with all its names (one Docker call), for the heartbeats."""
        def listing(client: docker.DockerClient) -> list[HeldImage]:
            return [HeldImage(id=image["Id"], size=max(int(image.get("Size") or 0), 0),
                              tags=[t for t in image.get("RepoTags") or () if t != "<none>:<none>"],
                              digests=[d for d in image.get("RepoDigests") or () if d != "<none>@<none>"])
                    for image in client.api.images()]

        return await self._run(listing)

    async def inspect_image(self, name: str) -> ImageDetail:
        def inspect(client: docker.DockerClient) -> ImageDetail:
            try:
                attrs = client.api.inspect_image(name)
            except docker.errors.APIError as exc:
                # 400 is an unparseable reference: no image can have that name either.
                if exc.status_code in (400, 404):
                    return ImageDetail(exists=False, name=name)
                raise
            return ImageDetail(
                exists=True,
                name=name,
                id=attrs["Id"],
                tags=attrs.get("RepoTags") or [],
                size=attrs.get("Size"),
                created=attrs.get("Created"),
                architecture=attrs.get("Architecture"),
                os=attrs.get("Os"),
            )

        return await self._run(inspect)

    async def remove_image(self, name: str, force: bool) -> list[dict[str, str]]:
        def remove(client: docker.DockerClient) -> list[dict[str, str]]:
            try:
                return client.api.remove_image(name, force=force) or []
            except docker.errors.APIError as exc:
                if exc.status_code in (400, 404):
                    raise ImageNotFound(f"no image {name!r} on this host") from None
                if exc.status_code == 409:
                    raise ImageInUse(str(exc.explanation)) from None
                raise

        removed = await self._run(remove)
        self.pulls_done += 1  # the heartbeats' image listing is taken again
        return removed

    async def prune_images(self) -> tuple[list[str], int]:
        def prune(client: docker.DockerClient) -> tuple[list[str], int]:
            result = client.images.prune(filters={"dangling": True})
            deleted = [next(iter(item.values())) for item in result.get("ImagesDeleted") or []]
            return deleted, int(result.get("SpaceReclaimed") or 0)

        pruned = await self._run(prune)
        self.pulls_done += 1  # the heartbeats' image listing is taken again
        return pruned

    async def pull_image(self, name: str, auth: dict[str, Any] | None) -> ImageDetail:
        repository, tag = parse_repository_tag(name)
        if not repository:
            raise InvalidRequest(f"{name!r} is not an image reference")

        def pull(client: docker.DockerClient) -> None:
            try:
                client.images.pull(name, auth_config=auth)
            except docker.errors.APIError as exc:
                raise ImagePullFailed(f"pulling {name!r} failed: {exc.explanation or exc}", {"image": name}) from None

        await self._run(pull)
        self.pulls_done += 1
        # Like Docker, a reference without tag or digest means ":latest".
        return await self.inspect_image(name if tag else f"{name}:latest")

    async def close(self) -> None:
        if self._client is not None:
            await self._run(lambda client: client.close())
        if self._stats_client is not None:
            await self._run(lambda client: client.close(), pool=self._stats_pool)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._log_pool.shutdown(wait=False, cancel_futures=True)
        self._wait_pool.shutdown(wait=False, cancel_futures=True)
        self._stats_pool.shutdown(wait=False, cancel_futures=True)


def _archive_call(
    client: docker.DockerClient, method: str, container: Container, params: dict[str, str], data: bytes | None = None,
    *, stream: bool = False,
) -> requests.Response:
    """``/containers/{id}/archive`` as the engine offers it: the SDK's own calls neither stat a path without
    reading it whole (HEAD) nor pass ``noOverwriteDirNonDir``. Errors are the SDK's ``APIError``s."""
    api = client.api
    url = f"{api.base_url}/v{api.api_version}/containers/{container.id}/archive"
    response = api.request(method, url, params=params, data=data, timeout=api.timeout, stream=stream)
    try:
        response.raise_for_status()
    except requests.HTTPError as exc:
        docker.errors.create_api_error_from_http_exception(exc)  # raises the SDK's APIError for it
    return response


def _api_error(exc: docker.errors.APIError) -> ControllerError:
    message = str(exc.explanation or exc)
    if exc.status_code == 404:
        return NotFound(message)
    if exc.status_code == 409:
        return Conflict(message)
    if exc.status_code == 400:
        return InvalidContainerConfig(message)
    return DockerError(message, {"docker_status": exc.status_code})


def _create_kwargs(spec: ContainerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword arguments of ``APIClient.create_container`` and of ``APIClient.create_host_config``
    for ``spec``: what the SDK's ``containers.create`` sends for the same container, made with public calls."""
    config: dict[str, Any] = {
        "labels": spec.labels,
        "environment": [f"{key}={value}" for key, value in spec.environment.items()],
    }
    host: dict[str, Any] = {
        "auto_remove": spec.auto_remove,
        # The hardening every managed container gets (controller.spec), whatever its spec asked.
        "security_opt": list(spec.security_opt),
        "pids_limit": spec.pids_limit,
        # Docker's default on cgroup v1 hosts is the host's cgroup namespace.
        "cgroupns": "private",
    }
    if spec.cap_add:
        host["cap_add"] = spec.cap_add
    if spec.cap_drop:
        host["cap_drop"] = list(spec.cap_drop)
    if spec.ports:
        # (ip, None) publishes on that address with a port Docker picks.
        host["port_bindings"] = {
            key: (spec.publish_ip, host_port) if spec.publish_ip else host_port for key, host_port in spec.ports.items()
        }
    if spec.volumes:
        # Mounts with an explicit type rather than binds: a named volume can never be read as a host
        # path, and only an allow-listed host path (controller.spec resolved it) is a bind.
        host["mounts"] = [
            Mount(
                target=mount["bind"],
                source=source,
                type="bind" if source.startswith("/") else "volume",
                # Host paths read-only whatever was asked (mmanager.policy: no symlink planted in an
                # allowed folder for Docker to follow on the next start).
                read_only=mount["mode"] == "ro" or source.startswith("/"),
            )
            for source, mount in spec.volumes.items()
        ]
    if spec.own_mounts:
        host["mounts"] = [*host.get("mounts", ()), *(
            Mount(target=mount.target, source=mount.source, type="bind", read_only=mount.read_only)
            for mount in spec.own_mounts)]
    optional_config = {"name": spec.name, "command": spec.command, "working_dir": spec.working_dir}
    config.update({key: value for key, value in optional_config.items() if value is not None})
    optional_host = {"mem_limit": spec.mem_limit, "nano_cpus": spec.nano_cpus, "restart_policy": spec.restart_policy,
                     "network_mode": spec.network_mode}
    host.update({key: value for key, value in optional_host.items() if value is not None})
    if spec.networks:
        # The first network is the container's network mode (the others are connected after the create);
        # ``{network: None}`` as NetworkingConfig is what containers.create sends with it: kept, so the
        # request is the same.
        host["network_mode"] = spec.networks[0]
        config["networking_config"] = {spec.networks[0]: None}
    return config, host


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _timestamp(value: int | None) -> str | None:
    return datetime.fromtimestamp(value, UTC).isoformat() if value else None


def _published(bindings: list[dict[str, str]] | None) -> int | None:
    for binding in bindings or []:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    return None


def _container_info(attrs: dict[str, Any]) -> ContainerInfo:
    config = attrs.get("Config") or {}
    host = attrs.get("HostConfig") or {}
    state = attrs.get("State") or {}
    labels = config.get("Labels") or {}
    # A stopped container has no live bindings; fall back to what it was configured with.
    live = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    configured = host.get("PortBindings") or {}
    ports = {key: _published(bindings) for key, bindings in {**configured, **live}.items()}
    return ContainerInfo(
        id=attrs["Id"],
        container_id=attrs["Id"],
        name=attrs.get("Name", "").lstrip("/"),
        image=config.get("Image", ""),
        status=state.get("Status", "unknown"),
        state=state,
        created=attrs.get("Created"),
        ports=ports,
        labels=labels,
        service_id=labels.get(LABEL_SERVICE) or None,
        epoch=_int_or_none(labels.get(LABEL_EPOCH)),
        job_id=labels.get(LABEL_JOB) or None,
        attempt_id=labels.get(LABEL_ATTEMPT) or None,
        memory_limit=host.get("Memory") or None,
        cpu_limit=(host.get("NanoCpus") or 0) / 1e9 or None,
        gpu_device_ids=label_gpu_ids(labels),
    )


def _summary_info(summary: dict[str, Any]) -> ContainerInfo:
    labels = summary.get("Labels") or {}
    ports: dict[str, int | None] = {}
    for port in summary.get("Ports") or []:
        key = f"{port['PrivatePort']}/{port.get('Type', 'tcp')}"
        ports[key] = ports.get(key) or port.get("PublicPort")
    return ContainerInfo(
        id=summary["Id"],
        container_id=summary["Id"],
        name=(summary.get("Names") or ["/"])[0].lstrip("/"),
        image=summary.get("Image", ""),
        status=summary.get("State", "unknown"),
        created=_timestamp(summary.get("Created")),
        ports=ports,
        labels=labels,
        service_id=labels.get(LABEL_SERVICE) or None,
        epoch=_int_or_none(labels.get(LABEL_EPOCH)),
        job_id=labels.get(LABEL_JOB) or None,
        attempt_id=labels.get(LABEL_ATTEMPT) or None,
        gpu_device_ids=label_gpu_ids(labels),
    )


def cpu_percent(usage: int, system: int, before_usage: int, before_system: int, online: int) -> float | None:
    """``docker stats``'s CPU figure between two readings of cumulative counters (nanoseconds: the
    container's CPU time, the host's): percent of one core, so up to 100 per online CPU. None where the
    counters give no figure: the container's went back (restarted, so counting afresh) or no host time
    passed between the readings."""
    if usage < before_usage or system <= before_system:
        return None
    return round((usage - before_usage) / (system - before_system) * online * 100, 3)


def _summarize_stats(container_id: str, name: str, status: str, raw: dict[str, Any],
                     started_at: str | None = None) -> ContainerStats:
    """Docker's stats reduced the way ``docker stats`` computes them: CPU between ``precpu_stats`` and
    ``cpu_stats``, 0 where there is no earlier reading (a one-shot read)."""
    cpu, precpu = raw.get("cpu_stats") or {}, raw.get("precpu_stats") or {}
    usage = int((cpu.get("cpu_usage") or {}).get("total_usage", 0))
    system = int(cpu.get("system_cpu_usage", 0))
    online = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or []) or 1
    before_system = int(precpu.get("system_cpu_usage", 0))
    between = cpu_percent(usage, system, int((precpu.get("cpu_usage") or {}).get("total_usage", 0)),
                          before_system, online) if before_system else None

    memory = raw.get("memory_stats") or {}
    detail = memory.get("stats") or {}
    # Page cache is reclaimable, so docker stats leaves it out (cgroup v1 and v2 name it differently).
    cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    in_use = max(int(memory.get("usage", 0)) - int(cache), 0)
    limit = int(memory.get("limit", 0))

    networks = (raw.get("networks") or {}).values()
    blkio = (raw.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    return ContainerStats(
        container_id=container_id,
        name=name,
        status=status,
        read=raw.get("read"),
        started_at=started_at,
        cpu_percent=between or 0.0,
        cpu_usage_ns=usage,
        system_cpu_usage_ns=system,
        online_cpus=online,
        memory_usage=in_use,
        memory_limit=limit,
        memory_percent=round(in_use / limit * 100, 3) if limit else 0.0,
        memory_usage_mb=round(in_use / 2**20, 3),
        memory_limit_mb=round(limit / 2**20, 3),
        network_rx_bytes=sum(n.get("rx_bytes", 0) for n in networks),
        network_tx_bytes=sum(n.get("tx_bytes", 0) for n in networks),
        block_read_bytes=sum(e.get("value", 0) for e in blkio if e.get("op", "").lower() == "read"),
        block_write_bytes=sum(e.get("value", 0) for e in blkio if e.get("op", "").lower() == "write"),
        pids=(raw.get("pids_stats") or {}).get("current", 0),
    )


def _stat(client: docker.DockerClient, container: Container, path: str) -> PathStat | None:
    try:
        response = _archive_call(client, "HEAD", container, {"path": path})
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError:
        # A HEAD answer has no body to say why; the same GET's does, before any content would come.
        # A file on the way (ENOTDIR) means nothing is there, as much as a 404 does.
        try:
            _archive_call(client, "GET", container, {"path": path}, stream=True).close()
        except docker.errors.APIError as exc:
            if "not a directory" in str(exc.explanation):
                return None
            raise
        raise DockerError(f"Docker could not stat {path}") from None
    header = response.headers.get("X-Docker-Container-Path-Stat")
    if not header:
        raise DockerError(f"Docker gave no stat for {path}")
    raw = json.loads(base64.b64decode(header))
    return PathStat(mode=int(raw["mode"]), size=int(raw.get("size") or 0), link_target=raw.get("linkTarget") or "")
