"""Artifacts (docs/API.md, Artifacts): the store of their bytes, by sha256, and their rows.

``ArtifactStore`` is the interface every store keeps: ``put`` a byte stream (hashed as it comes, refused past
a limit with nothing kept) and get back ``(digest, size)``, ``open`` a digest as a stream, ``exists``,
``size``, ``delete``. ``LocalArtifactStore`` keeps the bytes under ``MMANAGER_ARTIFACT_STORE`` (shared by every
hub replica, as the model store is) at ``sha256/<hex>``, written to ``tmp/`` and renamed into place. An
S3-compatible store can be added behind the same interface (a ``put`` that uploads to a temporary key and
copies it to ``sha256/<hex>`` once its hash is known, an ``open`` that streams a GET) through a well-kept
client library; nothing outside this module knows which store runs.

Invariants: a digest is visible in a store only complete and checked; a row (``artifacts``) exists only once its
bytes are stored. Many rows may name one digest (content addressing): the bytes go only when no row and no
attempt's log names them, and only by the leader's sweep (``Watcher.sweep_store``) once they are older than its
grace, never inline: an upload or a collection that put the same bytes a moment ago (a put makes the file new
again) records its row well within the grace. A user sees and uses only their own artifacts; an admin all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Select, Text, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.errors import Conflict, HubError, InvalidRequest, NotFound
from hub.job_schemas import ArtifactOut
from hub.models import ArtifactModel, JobAttemptModel, JobModel, UserModel
from mmanager.hashed import store_stream

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
# An upload's name: a file name, no directories.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
READ_CHUNK = 1024**2


class PayloadTooLarge(HubError):
    status_code = 413
    code = "PAYLOAD_TOO_LARGE"


class ArtifactQuotaExceeded(HubError):
    status_code = 507
    code = "ARTIFACT_QUOTA_EXCEEDED"


class ArtifactStoreFull(HubError):
    status_code = 507
    code = "ARTIFACT_STORE_FULL"


class ArtifactStore(ABC):
    """Bytes by sha256 digest (``sha256:<hex>``)."""

    @abstractmethod
    async def put(self, chunks: AsyncIterator[bytes], limit: int | None = None,
                  too_big: Callable[[int], Exception] | None = None) -> tuple[str, int]:
        """Store the stream: ``(digest, size)`` once it is retrievable by its digest. Past ``limit`` bytes
        ``too_big(size)`` is raised and nothing is kept; so is nothing when the stream fails."""

    @abstractmethod
    async def open(self, digest: str) -> AsyncIterator[bytes]:
        """The bytes as chunks; ``NotFound`` (ARTIFACT_NOT_FOUND) when the store lacks them. Opened before the
        first chunk is asked for: a delete meanwhile does not cut a read that began."""

    @abstractmethod
    async def exists(self, digest: str) -> bool: ...

    @abstractmethod
    async def size(self, digest: str) -> int | None:
        """Its size in bytes, None when the store lacks it."""

    @abstractmethod
    async def delete(self, digest: str) -> None:
        """Remove the bytes (nothing when they are not there)."""

    def sweep(self, grace: float) -> int:
        """Drop what a killed replica left half-written more than ``grace`` seconds ago; how many."""
        return 0

    async def stale(self, grace: float) -> list[str]:
        """The digests whose bytes were last put more than ``grace`` seconds ago (the sweep's candidates)."""
        return []

    async def drop_stale(self, digest: str, grace: float) -> bool:
        """Remove ``digest``'s bytes if they were still last put more than ``grace`` seconds ago; whether they
        went."""
        return False


class LocalArtifactStore(ArtifactStore):
    """A directory: ``sha256/<hex>`` and ``tmp/`` for writes under way (every replica sees the same one)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "sha256"
        self.tmp = root / "tmp"

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.fullmatch(digest):
            raise NotFound(f"artifact bytes {digest!r}: not a sha256 digest", code="ARTIFACT_NOT_FOUND")
        return self.files / digest.removeprefix("sha256:")

    def _dirs(self) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    async def put(self, chunks: AsyncIterator[bytes], limit: int | None = None,
                  too_big: Callable[[int], Exception] | None = None) -> tuple[str, int]:
        await asyncio.to_thread(self._dirs)
        # The file is new even when the digest was stored already: its age is the sweep's grace.
        return await store_stream(
            chunks, self.tmp / f"put-{uuid.uuid4().hex}", self.path, limit,
            too_big or (lambda size: PayloadTooLarge(f"more than {limit} bytes")),
            lambda why: ArtifactStoreFull(f"the artifact store's disk is full: {why}"))

    async def open(self, digest: str) -> AsyncIterator[bytes]:
        try:
            handle = await asyncio.to_thread(open, self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"artifact bytes {digest} are not in the store", code="ARTIFACT_NOT_FOUND") from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(handle.read, READ_CHUNK):
                    yield chunk
            finally:
                handle.close()

        return chunks()

    async def exists(self, digest: str) -> bool:
        return await asyncio.to_thread(self.path(digest).is_file)

    async def size(self, digest: str) -> int | None:
        try:
            return (await asyncio.to_thread(self.path(digest).stat)).st_size
        except FileNotFoundError:
            return None

    async def delete(self, digest: str) -> None:
        await asyncio.to_thread(self.path(digest).unlink, missing_ok=True)

    async def stale(self, grace: float) -> list[str]:
        return await asyncio.to_thread(self._stale, time.time() - grace)

    def _stale(self, cutoff: float) -> list[str]:
        try:
            entries = list(os.scandir(self.files))
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    out.append(f"sha256:{entry.name}")
        return [d for d in out if DIGEST_RE.fullmatch(d)]

    async def drop_stale(self, digest: str, grace: float) -> bool:
        return await asyncio.to_thread(self._drop_stale, self.path(digest), time.time() - grace)

    def _drop_stale(self, path: Path, cutoff: float) -> bool:
        # Moved aside first, then judged by its age: a put that made it new again just before is put back
        # (the same bytes), and one just after writes a file of its own.
        self.tmp.mkdir(parents=True, exist_ok=True)
        aside = self.tmp / f"gc-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if aside.stat().st_mtime >= cutoff:
            os.replace(aside, path)
            return False
        aside.unlink()
        return True

    def sweep(self, grace: float) -> int:
        cutoff = time.time() - grace
        removed = 0
        try:
            entries = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return 0
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed


async def read_all(store: ArtifactStore, digest: str, limit: int | None = None) -> bytes:
    """The bytes of ``digest`` (the last ``limit`` of them when given), for small things such as a log's tail."""
    out = bytearray()
    async for chunk in await store.open(digest):
        out += chunk
        if limit is not None and len(out) > 2 * limit:
            del out[:-limit]
    return bytes(out[-limit:]) if limit is not None else bytes(out)


# ------------------------------------------------------------------------------------------------ rows


def artifact_out(row: ArtifactModel, owner: str, attempt: int | None = None) -> ArtifactOut:
    return ArtifactOut(id=row.id, path=row.name, size=row.size, sha256=row.digest, owner=owner, job_id=row.job_id,
                       attempt=attempt, url=f"/api/artifacts/{row.id}/content", created_at=row.created_at)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest("an artifact's name is 1-255 letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit", {"name": name[:255]}, code="INVALID_ARTIFACT_NAME")
    return name


def visible(query: Select[Any], user: UserModel) -> Select[Any]:
    return query if user.is_admin else query.where(ArtifactModel.owner_id == user.id)


async def get_artifact(session: AsyncSession, artifact_id: str, user: UserModel) -> ArtifactModel:
    """The artifact, if the caller may see it (its owner, or an admin); else 404 ARTIFACT_NOT_FOUND."""
    row = await session.scalar(visible(select(ArtifactModel).where(ArtifactModel.id == artifact_id), user))
    if row is None:
        raise NotFound(f"artifact {artifact_id!r} not found", {"artifact": artifact_id}, code="ARTIFACT_NOT_FOUND")
    return row


async def outs(session: AsyncSession, rows: list[ArtifactModel]) -> list[ArtifactOut]:
    """Each row as the API shows it (its owner's name, its attempt's number): two reads for the whole page."""
    owner_ids = {r.owner_id for r in rows}
    names = dict((await session.execute(select(UserModel.id, UserModel.username)
                                        .where(UserModel.id.in_(owner_ids)))).all()) if owner_ids else {}
    attempt_ids = {r.attempt_id for r in rows if r.attempt_id}
    numbers = dict((await session.execute(select(JobAttemptModel.id, JobAttemptModel.number)
                                          .where(JobAttemptModel.id.in_(attempt_ids)))).all()) \
        if attempt_ids else {}
    return [artifact_out(r, names.get(r.owner_id, "?"), numbers.get(r.attempt_id or "")) for r in rows]


async def used_bytes(session: AsyncSession, owner_id: int) -> int:
    return int(await session.scalar(select(func.coalesce(func.sum(ArtifactModel.size), 0))
                                    .where(ArtifactModel.owner_id == owner_id)) or 0)


async def record_upload(session: AsyncSession, owner_id: int, name: str, digest: str, size: int,
                        quota: int | None = None, lock: bool = False,
                        over: Callable[[int], Exception] | None = None) -> tuple[ArtifactModel, bool]:
    """The upload's row, and whether it is new: the same name and bytes uploaded again keep their first row. A new
    row is checked against ``quota`` under the owner's row lock (``lock``: PostgreSQL), so uploads that streamed
    side by side cannot each spend what is left: ``over(used)`` is raised past it (the bytes are the sweep's)."""
    if lock:
        await session.execute(select(UserModel.id).where(UserModel.id == owner_id).with_for_update())
    found = await session.scalar(select(ArtifactModel).where(
        ArtifactModel.owner_id == owner_id, ArtifactModel.name == name, ArtifactModel.digest == digest,
        ArtifactModel.job_id.is_(None), ArtifactModel.attempt_id.is_(None)).limit(1))
    if found is not None:
        return found, False
    if quota is not None:
        used = await used_bytes(session, owner_id)
        if used + size > quota:
            raise (over(used) if over else ArtifactQuotaExceeded(f"the artifacts quota of {quota} bytes is spent"))
    row = ArtifactModel(owner_id=owner_id, name=name, digest=digest, size=size)
    session.add(row)
    await session.flush()
    return row, True


async def named_by_live_job(session: AsyncSession, artifact_id: str) -> list[str]:
    """The pending or running jobs whose spec names ``artifact_id`` (a text match narrows, the spec decides)."""
    rows = await session.execute(select(JobModel.id, JobModel.spec).where(
        JobModel.status.in_(("pending", "running")), cast(JobModel.spec, Text).like(f"%{artifact_id}%")))
    found = []
    for job_id, spec in rows:
        for ref in spec.get("inputs") or ():
            if ref == artifact_id or (isinstance(ref, dict) and ref.get("artifact") == artifact_id):
                found.append(job_id)
                break
    return found


async def delete_artifact(session: AsyncSession, artifact_id: str, user: UserModel) -> None:
    """Remove one of the caller's uploads (an admin: anyone's); 409 ARTIFACT_IN_USE while a pending or running
    job names it; a job's output is kept with its job (409 ARTIFACT_IS_OUTPUT). The row goes in the caller's
    transaction; the bytes are the sweep's, once nothing names them."""
    row = await get_artifact(session, artifact_id, user)
    if row.job_id is not None or row.attempt_id is not None:
        raise Conflict(f"artifact {artifact_id} is an output of job {row.job_id}; it is kept with its job",
                       {"job_id": row.job_id}, code="ARTIFACT_IS_OUTPUT")
    jobs = await named_by_live_job(session, artifact_id)
    if jobs:
        raise Conflict(f"artifact {artifact_id} is an input of {len(jobs)} pending or running job(s)",
                       {"jobs": jobs}, code="ARTIFACT_IN_USE")
    await session.delete(row)
    await session.commit()
