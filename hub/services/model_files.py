"""The model-file store: files uploaded through the API (``POST /api/model-files``), kept under
``MMANAGER_MODEL_STORE`` at ``sha256/<hex>`` and listed in ``model_files``; services name them in their
spec's ``models`` and controllers fetch them by digest (``controller.model_cache``).

Invariants: a file becomes visible (its bytes at ``sha256/<hex>``, then its row) only complete, within
``MMANAGER_MODEL_FILE_MAX_BYTES``, the store's and its uploader's byte limits, under the sha256 computed while
it streamed in: an upload is written to a temporary file in the store's own ``tmp/`` and renamed into place,
so a cut or refused upload never leaves a partial file under a digest. The body is never held in memory
whole. A file that a service's spec or a model type's names is never deleted: a spec's write holds its files'
rows (``lock_files``) and a delete removes the row before it looks for users. Every hub replica must see the
same directory (a shared volume) when there are several.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from sqlalchemy import Text, cast, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from hub.controller_client import ControllerClient
from hub.db import Database
from hub.db_direct import Tx, any_of
from hub.errors import Conflict, HubError, InvalidRequest, NotFound
from hub.models import ModelFileModel, ModelTypeModel, ServiceModel
from hub.schemas import DIGEST_PATTERN, MODEL_DIR, ModelMount, ServiceSpec
from mmanager.hashed import store_stream
from mmanager.wire import ModelsSynced

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(DIGEST_PATTERN.removeprefix("^").removesuffix("$"))
# Where a model file may not be mounted: the container's root itself, and the kernel's own trees.
_FORBIDDEN_MOUNTS = ("/proc", "/sys", "/dev")


class StoreFull(HubError):
    status_code = 507
    code = "MODEL_STORE_FULL"


class TooManyUploads(HubError):
    status_code = 429
    code = "TOO_MANY_UPLOADS"

    def __init__(self, message: str, details: dict[str, int], retry_after: int) -> None:
        super().__init__(message, {**details, "retry_after": retry_after})
        self.headers = {"Retry-After": str(retry_after)}


class ModelStore:
    """The store's directory and this replica's uploads under way; rows are read and written in the caller's
    session."""

    def __init__(self, root: Path, max_uploads: int = 4) -> None:
        self.root = root
        self.files = root / "sha256"
        self.tmp = root / "tmp"
        self.max_uploads = max_uploads
        self.uploads = 0

    def path(self, digest: str) -> Path:
        return self.files / digest.removeprefix("sha256:")

    @contextlib.contextmanager
    def upload_slot(self) -> Iterator[None]:
        """One of this replica's ``MMANAGER_MODEL_UPLOADS`` upload slots, else 429 TOO_MANY_UPLOADS."""
        if self.uploads >= self.max_uploads:
            raise TooManyUploads(f"{self.uploads} model-file uploads are under way on this hub; retry later",
                                 {"max_uploads": self.max_uploads}, retry_after=5)
        self.uploads += 1
        try:
            yield
        finally:
            self.uploads -= 1

    def sweep(self, grace: float) -> int:
        """Remove temporary files older than ``grace`` seconds (uploads a killed replica left): replicas share
        ``tmp/``, and a younger one may be another replica's upload under way. Returns how many went."""
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

    async def receive(self, chunks: AsyncIterator[bytes], limit: int | None = None,
                      too_big: Callable[[int], Exception] | None = None) -> tuple[str, int]:
        """Stream ``chunks`` into the store: ``(digest, size)`` once the file is at its digest's path. Past
        ``limit`` bytes, ``too_big(size)`` is raised. Whatever stops the stream (a limit, the caller gone)
        removes the temporary file."""
        await asyncio.to_thread(self._dirs)
        return await store_stream(
            chunks, self.tmp / f"upload-{uuid.uuid4().hex}", self.path, limit,
            too_big or (lambda size: StoreFull("the upload is over its limit")),
            lambda why: StoreFull(f"the model-file store's disk is full: {why}"))

    def _dirs(self) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()


def check_name(name: str | None, digest: str) -> str:
    """The name a file is listed (and by default mounted) under: the one given, else its digest's hex."""
    if name is None:
        return digest.removeprefix("sha256:")
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest("a model file's name is 1-128 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit", {"name": name[:128]}, code="INVALID_MODEL_FILE_NAME")
    return name


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise NotFound("a model file's digest is 'sha256:' and 64 lowercase hex digits", code="MODEL_FILE_NOT_FOUND")
    return digest


async def get_file(session: AsyncSession, store: ModelStore, digest: str) -> ModelFileModel:
    row = await session.get(ModelFileModel, check_digest(digest))
    if row is None or not await asyncio.to_thread(store.exists, digest):
        raise NotFound(f"model file {digest} is not in the store", code="MODEL_FILE_NOT_FOUND")
    return row


async def allowance(session: AsyncSession, store_max: int, per_user: int, username: str) -> tuple[int, Exception]:
    """The bytes ``username`` may upload now, and the error that refuses more: the store's room
    (``MMANAGER_MODEL_STORE_MAX_BYTES``, 507 MODEL_STORE_FULL) or theirs
    (``MMANAGER_MODEL_FILES_PER_USER_BYTES``, 409 MODEL_FILE_QUOTA_EXCEEDED), whichever is less. One read."""
    total, mine = (await session.execute(select(
        func.coalesce(func.sum(ModelFileModel.size), 0),
        func.coalesce(func.sum(ModelFileModel.size).filter(ModelFileModel.uploaded_by == username), 0)))).one()
    store_left, user_left = store_max - int(total), per_user - int(mine)
    if user_left < store_left:
        return max(user_left, 0), Conflict(
            f"{username}'s model files hold {int(mine)} of their {per_user} bytes; delete some first",
            {"used_bytes": int(mine), "limit_bytes": per_user}, code="MODEL_FILE_QUOTA_EXCEEDED")
    return max(store_left, 0), StoreFull(
        f"the model-file store holds {int(total)} of its {store_max} bytes; an admin must delete files first",
        {"used_bytes": int(total), "limit_bytes": store_max})


async def record(session: AsyncSession, digest: str, size: int, name: str, uploaded_by: str) -> tuple[ModelFileModel, bool]:
    """The file's row, and whether it is new: the same bytes uploaded again (at the same time too) keep their
    first row."""
    values = {"digest": digest, "name": name, "size": size, "uploaded_by": uploaded_by}
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    added = await session.scalar(insert(ModelFileModel).values(**values)
                                 .on_conflict_do_nothing(index_elements=["digest"])
                                 .returning(ModelFileModel.digest))
    row = await session.get(ModelFileModel, digest, populate_existing=True)
    assert row is not None
    return row, added is not None


_FILES = ModelFileModel.__table__.c
# The files a spec names, held until its transaction ends (FOR SHARE: specs naming the same file do not wait
# on each other, a delete waits on them). SQLite has no row locks: its writes are one at a time anyway.
_LOCK_FILES = select(_FILES.digest).where(any_of(_FILES.digest, "digests", sqlite=False)).with_for_update(read=True)
_LOCK_FILES_SQLITE = select(_FILES.digest).where(any_of(_FILES.digest, "digests", sqlite=True))


async def lock_files(tx: Tx, spec: ServiceSpec, *, sqlite: bool) -> None:
    """In the transaction that writes ``spec``: hold the rows of the files it names until it commits, so a
    delete waits for it and then sees the spec. A file deleted since the spec was checked: 422
    MODEL_FILE_NOT_FOUND. Nothing is read for a spec without models."""
    if not spec.models:
        return
    digests = [model.digest for model in spec.models]
    rows = await tx.all(_LOCK_FILES_SQLITE if sqlite else _LOCK_FILES, {"digests": digests})
    held = {row["digest"] for row in rows}
    missing = [digest for digest in digests if digest not in held]
    if missing:
        raise InvalidRequest(f"model file(s) not in the store: {', '.join(missing)}; upload them with "
                             "POST /api/model-files", {"missing": missing}, code="MODEL_FILE_NOT_FOUND")


async def users_of(session: AsyncSession, digest: str) -> list[str]:
    """The services and model types whose spec names ``digest`` (a text match narrows, the parsed spec
    decides)."""
    def names(spec: dict[str, object]) -> bool:
        models = spec.get("models") or ()
        return any(isinstance(m, dict) and m.get("digest") == digest for m in models)  # type: ignore[attr-defined]

    rows = await session.execute(select(ServiceModel.id, ServiceModel.name, ServiceModel.spec)
                                 .where(cast(ServiceModel.spec, Text).like(f"%{digest}%")))
    found = sorted(f"{name} ({sid})" for sid, name, spec in rows if names(spec))
    types = await session.execute(select(ModelTypeModel.name, ModelTypeModel.spec)
                                  .where(cast(ModelTypeModel.spec, Text).like(f"%{digest}%")))
    return found + sorted(f"model type {name}" for name, spec in types if names(spec))


async def delete_file(session: AsyncSession, store: ModelStore, digest: str, username: str, admin: bool) -> None:
    """Remove a file its uploader or an admin names, unless a spec names it (409 MODEL_FILE_IN_USE). The row
    goes first (its lock: a spec written meanwhile waits, then finds it gone), the users are looked for, the
    removal commits, and only then do the bytes go."""
    check_digest(digest)
    row = await session.get(ModelFileModel, digest)
    if row is None or not (admin or row.uploaded_by == username):
        # Another user's file is not theirs to delete, nor to learn about here.
        raise NotFound(f"model file {digest} is not in the store" + ("" if row is None else " as one of yours"),
                       code="MODEL_FILE_NOT_FOUND")
    gone = await session.scalar(delete(ModelFileModel).where(ModelFileModel.digest == digest)
                                .returning(ModelFileModel.digest))
    if gone is None:
        raise NotFound(f"model file {digest} is not in the store", code="MODEL_FILE_NOT_FOUND")
    services = await users_of(session, digest)
    if services:
        raise Conflict(f"model file {digest} is named by {len(services)} spec(s); change them first",
                       {"services": services}, code="MODEL_FILE_IN_USE")
    await session.commit()
    await asyncio.to_thread(store.path(digest).unlink, missing_ok=True)


def _mount_path(mount: str) -> str:
    path = posixpath.normpath(mount)
    if path == "/" or any(path == root or path.startswith(root + "/") for root in _FORBIDDEN_MOUNTS):
        raise InvalidRequest(f"a model file cannot be mounted at {mount}: not at /, nor under /proc, /sys or /dev",
                             {"mount": mount}, code="MODEL_MOUNT_CONFLICT")
    return path


async def resolve_models(db: Database, store: ModelStore, spec: ServiceSpec) -> ServiceSpec:
    """The spec with each model's mount filled in (``/app/models/<name>``), once every file it names is in
    the store (else 422 MODEL_FILE_NOT_FOUND) and no two mounts, nor a mount and a volume, share a path,
    nor is one at ``/`` or under ``/proc``, ``/sys``, ``/dev`` (422 MODEL_MOUNT_CONFLICT). A spec without
    models is returned as it is, without a database read."""
    if not spec.models:
        return spec
    digests = [model.digest for model in spec.models]
    async with db.session() as session:
        rows = {row.digest: row for row in await session.scalars(
            select(ModelFileModel).where(ModelFileModel.digest.in_(digests)))}
    missing = [digest for digest in digests
               if digest not in rows or not await asyncio.to_thread(store.exists, digest)]
    if missing:
        raise InvalidRequest(f"model file(s) not in the store: {', '.join(missing)}; upload them with "
                             "POST /api/model-files", {"missing": missing}, code="MODEL_FILE_NOT_FOUND")
    mounts = [_mount_path(m.mount or f"{MODEL_DIR}/{rows[m.digest].name}") for m in spec.models]
    models = [ModelMount(digest=m.digest, mount=mount) for m, mount in zip(spec.models, mounts, strict=True)]
    taken = {posixpath.normpath(path) for path in spec.volumes.values()}
    clashes = sorted({m for m in mounts if mounts.count(m) > 1 or m in taken})
    if clashes:
        raise InvalidRequest("two models, or a model and a volume, are mounted at the same path",
                             {"mounts": clashes}, code="MODEL_MOUNT_CONFLICT")
    return spec.model_copy(update={"models": models})


async def presync(client: ControllerClient, controller_id: str, url: str, spec: ServiceSpec,
                  timeout: float | None = None) -> ModelsSynced | None:
    """Have a controller fetch the spec's model files into its cache ahead of a create there (before each
    create, and a ``prefetch`` service's likely failover target), so that the create waits for no transfer.
    None when the spec names none (nothing is sent). Raises the controller's refusal
    (``MODEL_SYNC_FAILED`` and its kinds) as a create would."""
    if not spec.models:
        return None
    return await client.sync_models(controller_id, url, [model.digest for model in spec.models], timeout=timeout)
