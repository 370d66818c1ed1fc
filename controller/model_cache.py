"""The model-file cache: files of the hub's store (``hub.services.model_files``) that this controller's
containers mount read-only, fetched by digest before a container that names them is made.

Layout: ``MMANAGER_MODEL_CACHE_DIR/sha256/<hex>``, one copy per digest shared by every container here, each
bound read-only (``ContainerService.create``); ``tmp/`` holds downloads under way. Invariants:

- a file appears at its digest's path only once its bytes were fetched whole and hash to that digest: a
  download streams into ``tmp/`` while it is hashed and is renamed into place after the check; a mismatch
  (``MODEL_CHECKSUM_MISMATCH``) drops it, and the container is not made;
- the cache holds at most ``MMANAGER_MODEL_CACHE_BYTES``, downloads under way counted: room is made, once
  a download is verified, by evicting the least recently used files (a use is a sync or a create naming it;
  ties broken by an in-memory use counter, seeded from mtimes at start), never one a container on this
  server mounts (its ``mmanager.models`` label names it, running or stopped: a stopped one may start again)
  nor one a create or sync under way is about to mount (``_pins``); a file that cannot fit so is
  ``MODEL_CACHE_FULL``. Pins are taken and files marked used under the same lock as eviction, and each
  eviction looks at the live pins again before it removes a file;
- one download per digest at a time: a second sync of it waits for the first and finds it cached.

A job's outputs (``keep``) are copied in too, best effort, so a next step placed here mounts them without
fetching back from the hub what this server made; they take room as a download does.

Downloads go to ``MMANAGER_HUB_URL`` (each listed replica in turn until one answers) with the heartbeat key,
at ``/api/controllers/{SERVER_ID}/model-files/{digest}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx

from controller.config import ControllerSettings
from controller.credentials import HeartbeatKey
from controller.errors import ControllerError, ModelCacheFull, ModelChecksumMismatch, ModelSyncFailed
from controller.runtime import Runtime
from mmanager.hashed import HashedWriter
from mmanager.wire import ModelsSynced

log = logging.getLogger(__name__)

# The label on a container that names the model files it mounts (hex digests, comma-separated).
LABEL_MODELS = "mmanager.models"


def models_label(digests: Iterable[str]) -> str:
    return ",".join(sorted(digest.removeprefix("sha256:") for digest in digests))


class ModelCache:
    def __init__(self, settings: ControllerSettings, runtime: Runtime,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.root = settings.model_cache_dir.absolute()
        self.files = self.root / "sha256"
        self.tmp = self.root / "tmp"
        self.limit = settings.model_cache_bytes
        self.hub_urls = [url.strip().rstrip("/") for url in (settings.hub_url or "").split(",") if url.strip()]
        self.key = HeartbeatKey(settings)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._pins: Counter[str] = Counter()
        self._fetching: dict[str, asyncio.Lock] = {}
        # Making room, renaming into place, pinning and marking used, one at a time: two downloads never both
        # count the same free bytes, and no file is evicted between a sync's pin (or use) and its mount.
        self._room = asyncio.Lock()
        # Bytes each download under way has received (by its temporary file's name).
        self._inflight: dict[str, int] = {}
        # The order of last uses (hex digest -> a rising count): mtimes alone tie within their resolution.
        self._uses: dict[str, int] = {}
        self._clock = 0

    def path(self, digest: str) -> Path:
        return self.files / digest.removeprefix("sha256:")

    def start(self) -> None:
        """At start (in a thread): remove ``tmp/`` (downloads a stopped controller left; this controller is
        the cache's only writer) and seed the use order from the files' mtimes."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for name, _, _ in sorted(_entries(self.files), key=lambda entry: (entry[2], entry[0])):
            self._used(name)

    def _used(self, hexdigest: str) -> None:
        self._clock += 1
        self._uses[hexdigest] = self._clock

    def _order(self, entries: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
        """Least recently used first: by the use counter, then mtime, then name (deterministic)."""
        return sorted(entries, key=lambda entry: (self._uses.get(entry[0], 0), entry[2], entry[0]))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @contextlib.asynccontextmanager
    async def pinned(self, digests: Iterable[str]) -> AsyncIterator[None]:
        """Never evicted while held (a create between its sync and its container's existence)."""
        held = list(digests)
        async with self._room:
            self._pins.update(held)
        try:
            yield
        finally:
            self._pins.subtract(held)
            self._pins += Counter()  # drop the zeros

    async def sync(self, digests: Iterable[str]) -> ModelsSynced:
        """Every file of ``digests`` cached here, verified: fetched from the hub when missing, marked used when
        present. Raises ``ModelSyncFailed`` (or its kinds) with nothing half-made left behind."""
        started = time.monotonic()
        done = ModelsSynced()
        wanted = list(dict.fromkeys(digests))
        async with self.pinned(wanted):
            for digest in wanted:
                lock = self._fetching.setdefault(digest, asyncio.Lock())
                async with lock:
                    if await self._mark_cached(digest):
                        done.cached.append(digest)
                        continue
                    done.bytes += await self._fetch(digest)
                    done.fetched.append(digest)
        done.seconds = round(time.monotonic() - started, 3)
        if done.fetched:
            log.info("fetched model file(s) %s from the hub: %d bytes in %.2f s", ", ".join(done.fetched),
                     done.bytes, done.seconds)
        return done

    # -- fetching ----------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport, verify=self.settings.tls.client_context(),
                # No overall bound: a large file takes as long as it takes while bytes keep coming.
                timeout=httpx.Timeout(60.0, connect=5.0))
        return self._client

    async def _fetch(self, digest: str) -> int:
        if not self.hub_urls:
            raise ModelSyncFailed(f"model file {digest} is not cached here and this controller has no "
                                  "MMANAGER_HUB_URL to fetch it from", {"digest": digest})
        failures: list[str] = []
        for hub in self.hub_urls:
            url = f"{hub}/api/controllers/{self.settings.server_id}/model-files/{digest}"
            try:
                return await self._download(url, digest)
            except httpx.TransportError as exc:
                failures.append(f"{hub}: {type(exc).__name__}: {exc}")
        raise ModelSyncFailed(f"model file {digest} could not be fetched from the hub: {'; '.join(failures)}",
                              {"digest": digest, "hubs": failures})

    async def _download(self, url: str, digest: str) -> int:
        headers = {"Authorization": f"Bearer {self.key.current()}"}
        async with self._http().stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread())[:500].decode(errors="replace")
                raise ModelSyncFailed(f"the hub answered {response.status_code} for model file {digest}: {body}",
                                      {"digest": digest, "status": response.status_code})
            tmp = self.tmp / f"{digest.removeprefix('sha256:')}.{uuid.uuid4().hex}"
            try:
                await asyncio.to_thread(self._dirs)
                out = await asyncio.to_thread(open, tmp, "wb")
            except OSError as exc:
                raise ModelSyncFailed(f"the model cache {self.root} cannot be written: {exc}",
                                      {"digest": digest, "cache_dir": str(self.root)}) from None
            try:
                # A declared size over the whole cache is refused at once; nothing is evicted for a size
                # the download has not shown yet (room is made once its bytes are checked).
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit():
                    self._too_big(int(declared), digest)
                writer = HashedWriter(out)
                self._inflight[tmp.name] = 0
                async for chunk in response.aiter_bytes():
                    size = writer.size + len(chunk)
                    self._too_big(size, digest)
                    self._inflight[tmp.name] = size
                    await writer.write(chunk)
                size = writer.size
                got = await writer.finish()
                if got != digest:
                    raise ModelChecksumMismatch(
                        f"model file {digest}: the {size} bytes fetched hash to {got}; dropped",
                        {"digest": digest, "got": got, "bytes": size})
                await self._install(tmp, digest, size)
            except BaseException:
                out.close()
                tmp.unlink(missing_ok=True)
                raise
            finally:
                self._inflight.pop(tmp.name, None)
        return size

    async def keep(self, digest: str, source: Path, size: int) -> bool:
        """Copy ``source``, a file this server made whose bytes hash to ``digest`` (an ended job's output,
        hashed for its manifest), into the cache. Best effort: False when it does not fit or is gone.

        Not hashed again: the job that wrote it has ended, and its folder is this controller's alone. A copy,
        not a link: the job's user owns the output's inode and could change it through another path."""
        if size > self.limit:
            return False
        async with self._fetching.setdefault(digest, asyncio.Lock()):
            if await self._mark_cached(digest):
                return True
            tmp = self.tmp / f"{digest.removeprefix('sha256:')}.{uuid.uuid4().hex}"
            self._inflight[tmp.name] = size
            kept = False
            try:
                await asyncio.to_thread(self._dirs)
                if await asyncio.to_thread(_copy, source, tmp) != size:
                    raise OSError(f"{source} changed size since it was hashed")
                await self._install(tmp, digest, size)
                kept = True
            except (OSError, ControllerError) as exc:
                log.info("output %s not kept in the model cache: %s", digest, exc)
            finally:
                self._inflight.pop(tmp.name, None)
                if not kept:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
        return kept

    async def _mark_cached(self, digest: str) -> bool:
        """Whether the file is cached, marked used if so (under the eviction lock: not evicted meanwhile)."""
        async with self._room:
            if not await asyncio.to_thread(_touch, self.path(digest)):
                return False
            self._used(digest.removeprefix("sha256:"))
            return True

    async def _install(self, tmp: Path, digest: str, size: int) -> None:
        """``tmp``, whole and checked, renamed into place once room is made for it, and marked used."""
        async with self._room:
            await self._evict(size, digest, own=tmp.name)
            await asyncio.to_thread(_publish, tmp, self.path(digest))
            self._used(digest.removeprefix("sha256:"))

    def _dirs(self) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- eviction ----------------------------------------------------------

    def _too_big(self, size: int, digest: str) -> None:
        if size > self.limit:
            raise ModelCacheFull(f"model file {digest} ({size} bytes or more) is larger than the whole cache "
                                 f"(MMANAGER_MODEL_CACHE_BYTES {self.limit})",
                                 {"digest": digest, "bytes": size, "cache_bytes": self.limit})

    def _pinned(self) -> set[str]:
        return {d.removeprefix("sha256:") for d, count in self._pins.items() if count > 0}

    async def _evict(self, need: int, digest: str, own: str = "") -> None:
        """Evict least recently used files until ``need`` more bytes fit beside the other downloads under way
        (the caller holds ``_room``)."""
        entries = await asyncio.to_thread(_entries, self.files)
        used = sum(size for _, size, _ in entries) + sum(n for name, n in self._inflight.items() if name != own)
        if used + need <= self.limit:
            return
        in_use = await self.mounted()
        for name, size, _ in self._order(entries):
            if used + need <= self.limit:
                break
            # The live pins, looked at again for each file: never one a sync or create now holds.
            if name in in_use or name in self._pinned():
                continue
            await asyncio.to_thread((self.files / name).unlink, missing_ok=True)
            self._uses.pop(name, None)
            used -= size
            log.info("evicted model file sha256:%s (%d bytes) from the cache", name, size)
        if used + need > self.limit:
            raise ModelCacheFull(
                f"model file {digest} ({need} bytes) does not fit in the cache: {used} of "
                f"{self.limit} bytes are held by files containers here mount",
                {"digest": digest, "bytes": need, "cache_bytes": self.limit, "in_use_bytes": used})

    async def mounted(self) -> set[str]:
        """Hex digests that a managed container on this server (running or not) mounts."""
        containers = await self.runtime.list_containers(all=True, detailed=False)
        return {hexdigest for container in containers
                for hexdigest in container.labels.get(LABEL_MODELS, "").split(",") if hexdigest}

    def cached(self) -> list[tuple[str, int]]:
        """``(digest, bytes)`` of every cached file, least recently used first."""
        return [(f"sha256:{name}", size) for name, size, _ in self._order(_entries(self.files))]


def _entries(files: Path) -> list[tuple[str, int, float]]:
    """(hex digest, size, last use) of each cached file."""
    try:
        found = list(os.scandir(files))
    except FileNotFoundError:
        return []
    out = []
    for entry in found:
        with contextlib.suppress(FileNotFoundError):
            st = entry.stat()
            out.append((entry.name, st.st_size, st.st_mtime))
    return out


def _touch(path: Path) -> bool:
    """Mark a cached file used now (its mtime orders eviction); False when it is not cached."""
    try:
        os.utime(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _copy(source: Path, target: Path) -> int:
    """``source``'s bytes into a new ``target`` in the kernel (a link in its place is not followed)."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with open(target, "xb") as out:
            copied = 0
            while sent := os.sendfile(out.fileno(), fd, copied, 1 << 30):
                copied += sent
    finally:
        os.close(fd)
    return copied


def _publish(tmp: Path, final: Path) -> None:
    # Read-only for everyone: no container, and no process here, changes what others mount.
    os.chmod(tmp, 0o444)
    os.replace(tmp, final)
