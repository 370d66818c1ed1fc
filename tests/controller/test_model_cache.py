"""The controller's model-file cache on the fake runtime, with a stand-in hub (an httpx MockTransport serving
files by digest): verified downloads, one copy per digest, least-recently-used eviction within a small
cache that never evicts a file a container here mounts, and creates that bind the files read-only or are
refused with nothing made."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.containers import ContainerService
from controller.errors import ModelCacheFull, ModelChecksumMismatch, ModelSyncFailed
from controller.fake import FakeRuntime
from controller.model_cache import LABEL_MODELS, ModelCache
from controller.spec import ContainerSpec
from examples.images import EXAMPLE_IMAGE
from mmanager.wire import LABEL_CONTROLLER, LABEL_MANAGED, ContainerCreate, ModelFile
from tests.controller.conftest import make_settings
from tests.support.poll import eventually

KB = 1024


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Hub:
    """Serves ``files`` at the controllers' download path; counts the downloads; ``corrupt`` serves other bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.downloads: list[str] = []
        self.corrupt: set[str] = set()
        self.auth: list[str] = []

    def add(self, data: bytes) -> str:
        digest = digest_of(data)
        self.files[digest] = data
        return digest

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization", ""))
        digest = request.url.path.rsplit("/", 1)[-1]
        if digest not in self.files:
            return httpx.Response(404, json={"error": {"code": "MODEL_FILE_NOT_FOUND"}})
        self.downloads.append(digest)
        data = self.files[digest]
        return httpx.Response(200, content=data[:-1] + b"!" if digest in self.corrupt else data)


@pytest.fixture
def hub() -> Hub:
    return Hub()


def cache_for(tmp_path: Path, hub: Hub, runtime: FakeRuntime, limit: int) -> ModelCache:
    settings = make_settings("cache-ctl", hub_url="http://hub.test", model_cache_dir=tmp_path / "cache",
                             model_cache_bytes=limit)
    return ModelCache(settings, runtime, transport=httpx.MockTransport(hub.handle))


def cached(cache: ModelCache) -> set[str]:
    return {digest for digest, _ in cache.cached()}


def leftovers(cache: ModelCache) -> list[str]:
    return sorted(p.name for p in cache.tmp.iterdir()) if cache.tmp.exists() else []


def mount_in_container(runtime: FakeRuntime, digest: str) -> None:
    runtime.add_container(ContainerSpec(image=EXAMPLE_IMAGE, labels={
        LABEL_MANAGED: "true", LABEL_CONTROLLER: runtime.server_id, LABEL_MODELS: digest.removeprefix("sha256:")}),
        status="exited")


async def test_a_sync_fetches_once_verifies_and_keeps_one_read_only_copy(tmp_path: Path, hub: Hub) -> None:
    runtime = FakeRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 10 * KB)
    a = hub.add(b"a" * KB)
    first = await cache.sync([a, a])
    assert (first.fetched, first.cached, first.bytes) == ([a], [], KB)
    second = await cache.sync([a])
    assert (second.fetched, second.cached) == ([], [a])
    assert hub.downloads == [a]
    path = cache.path(a)
    assert path.read_bytes() == b"a" * KB and path.stat().st_mode & 0o777 == 0o444
    # The controller's own key (here the shared one): the hub's download route checks it.
    assert hub.auth == [f"Bearer {cache.settings.api_key.get_secret_value()}"]
    await cache.aclose()


async def test_the_least_recently_used_file_is_evicted_and_a_mounted_one_never(tmp_path: Path, hub: Hub) -> None:
    runtime = FakeRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 3 * KB)
    a, b, c, d, e = (hub.add(bytes([n]) * KB) for n in range(5))
    for digest in (a, b, c):
        await cache.sync([digest])
    await cache.sync([a])  # a used again: b is now the least recently used
    await cache.sync([d])
    assert cached(cache) == {a, c, d}
    # c is mounted by a container here (stopped: it may start again): the next eviction passes it over.
    mount_in_container(runtime, c)
    await cache.sync([e])
    assert cached(cache) == {c, d, e}
    assert sum(size for _, size in cache.cached()) <= 3 * KB
    await cache.aclose()


async def test_a_file_that_cannot_fit_is_refused_and_nothing_is_evicted_for_it(tmp_path: Path, hub: Hub) -> None:
    runtime = FakeRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 2 * KB)
    a, b, big = hub.add(b"a" * KB), hub.add(b"b" * KB), hub.add(b"x" * 3 * KB)
    await cache.sync([a, b])
    with pytest.raises(ModelCacheFull):
        await cache.sync([big])
    mount_in_container(runtime, a)
    mount_in_container(runtime, b)
    c = hub.add(b"c" * KB)
    with pytest.raises(ModelCacheFull) as refused:
        await cache.sync([c])
    assert refused.value.details["in_use_bytes"] == 2 * KB
    assert cached(cache) == {a, b} and leftovers(cache) == []
    await cache.aclose()


async def test_bytes_that_do_not_match_their_digest_are_dropped(tmp_path: Path, hub: Hub) -> None:
    runtime = FakeRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 10 * KB)
    a = hub.add(b"a" * KB)
    hub.corrupt.add(a)
    with pytest.raises(ModelChecksumMismatch) as mismatch:
        await cache.sync([a])
    assert mismatch.value.code == "MODEL_CHECKSUM_MISMATCH" and mismatch.value.details["digest"] == a
    assert cached(cache) == set() and leftovers(cache) == []
    missing = digest_of(b"nowhere")
    with pytest.raises(ModelSyncFailed) as failed:
        await cache.sync([missing])
    assert failed.value.code == "MODEL_SYNC_FAILED" and failed.value.details["status"] == 404
    await cache.aclose()


async def test_a_create_binds_its_models_read_only_or_makes_nothing(tmp_path: Path, hub: Hub) -> None:
    runtime = FakeRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 10 * KB)
    service = ContainerService(cache.settings, runtime, [], models=cache)
    a = hub.add(b"weights" * 100)
    created = await service.create(ContainerCreate(image=EXAMPLE_IMAGE, service_id="s1", epoch=1,
                                                   models=[ModelFile(digest=a, mount="/app/models/w.bin")]))
    [container] = runtime.containers.values()
    assert container.id == created.container_id
    assert container.spec.volumes == {str(cache.path(a)): {"bind": "/app/models/w.bin", "mode": "ro"}}
    assert container.spec.labels[LABEL_MODELS] == a.removeprefix("sha256:")

    bad = hub.add(b"other")
    hub.corrupt.add(bad)
    with pytest.raises(ModelChecksumMismatch):
        await service.create(ContainerCreate(image=EXAMPLE_IMAGE, service_id="s2", epoch=1,
                                             models=[ModelFile(digest=bad, mount="/app/models/o.bin")]))
    assert len(runtime.containers) == 1 and runtime.creates == 1
    await cache.aclose()


class BlockingRuntime(FakeRuntime):
    """Holds an eviction in the middle: its look at the mounted files waits until ``go`` is set."""

    def __init__(self, server_id: str) -> None:
        super().__init__(server_id)
        self.looking, self.go = asyncio.Event(), asyncio.Event()
        self.block = False

    async def list_containers(self, *args: Any, **kwargs: Any) -> Any:
        if self.block:
            self.looking.set()
            await self.go.wait()
        return await super().list_containers(*args, **kwargs)


async def test_a_file_a_sync_reports_ready_is_never_evicted_by_an_eviction_under_way(tmp_path: Path, hub: Hub) -> None:
    """A sync of a cached file (a create about to mount it) during another download's eviction: the file is
    there when the sync answers, whichever of them goes first."""
    runtime = BlockingRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 2 * KB)
    a, b, c = (hub.add(bytes([n]) * KB) for n in range(3))
    await cache.sync([a])
    await cache.sync([b])
    runtime.block = True
    evicting = asyncio.create_task(cache.sync([c]))  # needs room: a, the least recently used, is its pick
    await runtime.looking.wait()
    using = asyncio.create_task(cache.sync([a]))
    # The sync of a waits for the eviction under way (or, unfixed, answers at once from a snapshot).
    await eventually(lambda: using.done() or cache._room.locked() and len(cache._room._waiters or ()) > 0,
                     5, "the sync of a to answer or wait its turn")
    runtime.go.set()
    await asyncio.gather(evicting, using)
    assert cache.path(a).is_file(), "a sync answered for a file then evicted"
    assert cache.path(c).is_file()
    await cache.aclose()


async def test_nothing_is_evicted_for_a_download_that_fails_its_check(tmp_path: Path, hub: Hub) -> None:
    runtime = FakeRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 2 * KB)
    a, b, bad = (hub.add(bytes([n]) * KB) for n in range(3))
    await cache.sync([a])
    await cache.sync([b])
    hub.corrupt.add(bad)  # declared at its full size, its bytes wrong
    with pytest.raises(ModelChecksumMismatch):
        await cache.sync([bad])
    assert cached(cache) == {a, b} and leftovers(cache) == []
    await cache.aclose()


async def test_start_clears_tmp_and_equal_mtimes_evict_in_order_of_use(tmp_path: Path, hub: Hub) -> None:
    runtime = FakeRuntime("cache-ctl")
    cache = cache_for(tmp_path, hub, runtime, 3 * KB)
    files = [hub.add(bytes([n]) * KB) for n in range(4)]
    for digest in files[:3]:
        await cache.sync([digest])
    # Same mtime for all three: the use order alone (0, then 1, then 2) decides.
    for digest in files[:3]:
        os.utime(cache.path(digest), (1_000_000, 1_000_000))
    cache.tmp.mkdir(parents=True, exist_ok=True)
    (cache.tmp / "left-by-a-killed-download").write_bytes(b"partial")
    await cache.sync([files[0]])  # 0 used again: 1 is now the least recently used
    await cache.sync([files[3]])
    assert cached(cache) == {files[0], files[2], files[3]}
    await cache.aclose()
    # A restart: tmp/ goes, and the order is seeded from the mtimes (ties by name), deterministically.
    again = cache_for(tmp_path, hub, runtime, 3 * KB)
    again.start()
    assert leftovers(again) == []
    assert again.cached()[0][0] == files[2]  # the oldest mtime of those left
    await again.aclose()


async def test_downloads_under_way_count_against_the_cache_limit(tmp_path: Path, hub: Hub) -> None:
    """Files and the bytes of downloads still streaming stay within the limit together: a file published
    while another streams makes room for what that one has received so far too."""
    a, b, c = (bytes([n]) * KB for n in range(3))
    da, db, dc = hub.add(a), hub.add(b), hub.add(c)
    halfway, finish = asyncio.Event(), asyncio.Event()

    async def slow_b() -> Any:
        yield b[:KB // 2]
        halfway.set()
        await finish.wait()
        yield b[KB // 2:]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(db):
            return httpx.Response(200, content=slow_b())
        return hub.handle(request)

    settings = make_settings("cache-ctl", hub_url="http://hub.test", model_cache_dir=tmp_path / "cache",
                             model_cache_bytes=2 * KB)
    cache = ModelCache(settings, FakeRuntime("cache-ctl"), transport=httpx.MockTransport(handle))
    await cache.sync([da])
    streaming = asyncio.create_task(cache.sync([db]))
    await halfway.wait()  # b's first half received (counted before its next bytes are asked for)
    await cache.sync([dc])
    # Room for c beside the half of b under way: a, the least recently used, went.
    assert cached(cache) == {dc}
    finish.set()
    await streaming
    assert cached(cache) == {db, dc} and sum(size for _, size in cache.cached()) <= 2 * KB
    await cache.aclose()
