"""The model-file store: files uploaded through the API (``POST /api/model-files``), kept under
``MMANAGER_MODEL_STORE`` at ``sha256/<hex>`` and listed in ``model_files``; services name them in their
spec's ``models`` and controllers fetch them by digest (``controller.model_cache``).

Invariants: a file becomes visible (its bytes at ``sha256/<hex>``, then its row) only complete, within
``MMANAGER_MODEL_FILE_MAX_BYTES``, under the sha256 computed while it streamed in: an upload is written to a
temporary file in the store's own ``tmp/`` and renamed into place, so a cut or refused upload never leaves a
partial file under a digest. The body is never held in memory whole. A file a service's spec names is never
deleted. Every hub replica must see the same directory (a shared volume) when there are several.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Text, cast, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.controller_client import ControllerClient
from hub.db import Database
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.models import ModelFileModel, ServiceModel
from hub.schemas import DIGEST_PATTERN, MODEL_DIR, ModelMount, ServiceSpec
from mmanager.wire import ModelsSynced

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(DIGEST_PATTERN)
# Bytes gathered before each write to disk: one thread hop per MiB, not per network chunk.
_WRITE_BATCH = 1024**2


class ModelStore:
    """The store's directory; rows are read and written in the caller's session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "sha256"
        self.tmp = root / "tmp"

    def path(self, digest: str) -> Path:
        return self.files / digest.removeprefix("sha256:")

    async def receive(self, chunks: AsyncIterator[bytes]) -> tuple[str, int]:
        """Stream ``chunks`` into the store: ``(digest, size)`` once the file is at its digest's path.
        Whatever stops the stream (the body limit's 413, the caller gone) removes the temporary file."""
        await asyncio.to_thread(self._dirs)
        tmp = self.tmp / f"upload-{uuid.uuid4().hex}"
        hasher = hashlib.sha256()
        size = 0
        pending: list[bytes] = []
        held = 0
        out = await asyncio.to_thread(open, tmp, "wb")
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                hasher.update(chunk)
                size += len(chunk)
                pending.append(chunk)
                held += len(chunk)
                if held >= _WRITE_BATCH:
                    await asyncio.to_thread(out.writelines, pending)
                    pending, held = [], 0
            await asyncio.to_thread(_finish, out, pending)
            digest = "sha256:" + hasher.hexdigest()
            await asyncio.to_thread(os.replace, tmp, self.path(digest))
        except BaseException:
            out.close()
            tmp.unlink(missing_ok=True)
            raise
        return digest, size

    def _dirs(self) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()


def _finish(out: BinaryIO, pending: list[bytes]) -> None:
    """The last bytes written, flushed to disk, closed: a renamed file is a complete one after a crash too."""
    out.writelines(pending)
    out.flush()
    os.fsync(out.fileno())
    out.close()


def check_name(name: str | None, digest: str) -> str:
    """The name a file is listed (and by default mounted) under: the one given, else its digest's hex."""
    if name is None:
        return digest.removeprefix("sha256:")
    if not NAME_RE.match(name):
        raise InvalidRequest("a model file's name is 1-128 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit", {"name": name[:128]}, code="INVALID_MODEL_FILE_NAME")
    return name


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise NotFound("a model file's digest is 'sha256:' and 64 lowercase hex digits", code="MODEL_FILE_NOT_FOUND")
    return digest


async def get_file(session: AsyncSession, store: ModelStore, digest: str) -> ModelFileModel:
    row = await session.get(ModelFileModel, check_digest(digest))
    if row is None or not await asyncio.to_thread(store.exists, digest):
        raise NotFound(f"model file {digest} is not in the store", code="MODEL_FILE_NOT_FOUND")
    return row


async def record(session: AsyncSession, digest: str, size: int, name: str, uploaded_by: str) -> tuple[ModelFileModel, bool]:
    """The file's row, and whether it is new: the same bytes uploaded again keep their first row."""
    row = await session.get(ModelFileModel, digest)
    if row is not None:
        return row, False
    row = ModelFileModel(digest=digest, name=name, size=size, uploaded_by=uploaded_by)
    session.add(row)
    await session.flush()
    return row, True


async def users_of(session: AsyncSession, digest: str) -> list[str]:
    """Names of the services whose spec names ``digest`` (a text match narrows, the parsed spec decides)."""
    rows = await session.execute(select(ServiceModel.id, ServiceModel.name, ServiceModel.spec)
                                 .where(cast(ServiceModel.spec, Text).like(f"%{digest}%")))
    return sorted(f"{name} ({sid})" for sid, name, spec in rows
                  if any(m.get("digest") == digest for m in spec.get("models") or ()))


async def delete_file(session: AsyncSession, store: ModelStore, digest: str) -> None:
    row = await session.get(ModelFileModel, check_digest(digest))
    if row is None:
        raise NotFound(f"model file {digest} is not in the store", code="MODEL_FILE_NOT_FOUND")
    services = await users_of(session, digest)
    if services:
        raise Conflict(f"model file {digest} is named by {len(services)} service(s); change their specs first",
                       {"services": services}, code="MODEL_FILE_IN_USE")
    await session.delete(row)
    await session.flush()
    await asyncio.to_thread(store.path(digest).unlink, missing_ok=True)


async def resolve_models(db: Database, store: ModelStore, spec: ServiceSpec) -> ServiceSpec:
    """The spec with each model's mount filled in (``/app/models/<name>``), once every file it names is in
    the store (else 422 MODEL_FILE_NOT_FOUND) and no two mounts, nor a mount and a volume, share a path
    (422 MODEL_MOUNT_CONFLICT). A spec without models is returned as it is, without a database read."""
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
    mounts = [m.mount or f"{MODEL_DIR}/{rows[m.digest].name}" for m in spec.models]
    models = [ModelMount(digest=m.digest, mount=mount) for m, mount in zip(spec.models, mounts, strict=True)]
    taken = set(spec.volumes.values())
    clashes = sorted({m for m in mounts if mounts.count(m) > 1 or m in taken})
    if clashes:
        raise InvalidRequest("two models, or a model and a volume, are mounted at the same path",
                             {"mounts": clashes}, code="MODEL_MOUNT_CONFLICT")
    return spec.model_copy(update={"models": models})


async def presync(client: ControllerClient, controller_id: str, url: str, spec: ServiceSpec) -> ModelsSynced | None:
    """Have a controller fetch the spec's model files into its cache ahead of a create there (a ``prefetch``
    service's likely failover target), so that a move there waits for no transfer. None when the spec names
    none (nothing is sent). Raises the controller's refusal (``MODEL_SYNC_FAILED`` and its kinds) as a create
    would."""
    if not spec.models:
        return None
    return await client.sync_models(controller_id, url, [model.digest for model in spec.models])
