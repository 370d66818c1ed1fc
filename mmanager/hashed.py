"""A file written from a byte stream and hashed as it comes, for the hub's model-file store and a controller's
model cache alike. Invariant: the event loop never hashes or writes a byte (each batch is hashed and written
in one thread hop), and ``finish`` returns only once the bytes are on disk, so a file renamed into place
after it is complete after a crash too."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

# Bytes gathered before one thread hop writes and hashes them.
WRITE_BATCH = 1024**2


class HashedWriter:
    """Writes to ``out`` (opened for binary writing) and hashes with sha256; the caller closes ``out`` when it
    gives up before ``finish``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.size = 0
        self._hasher = hashlib.sha256()
        self._pending: list[bytes] = []
        self._held = 0

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._pending.append(chunk)
        self._held += len(chunk)
        if self._held >= WRITE_BATCH:
            pending, self._pending, self._held = self._pending, [], 0
            await asyncio.to_thread(self._write, pending)

    async def finish(self) -> str:
        """The last bytes written, flushed, fsynced and ``out`` closed: the digest, ``sha256:<hex>``."""
        pending, self._pending, self._held = self._pending, [], 0
        await asyncio.to_thread(self._finish, pending)
        return "sha256:" + self._hasher.hexdigest()

    def _write(self, pending: list[bytes]) -> None:
        for chunk in pending:
            self._hasher.update(chunk)
        self.out.writelines(pending)

    def _finish(self, pending: list[bytes]) -> None:
        self._write(pending)
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()


async def store_stream(chunks: AsyncIterator[bytes], tmp: Path, dest: Callable[[str], Path], limit: int | None,
                       too_big: Callable[[int], Exception], disk_full: Callable[[str], Exception]) -> tuple[str, int]:
    """Stream ``chunks`` into ``tmp``, hashed as they come, then rename it to ``dest(digest)``; the digest
    (``sha256:<hex>``) and size. Past ``limit`` bytes ``too_big(size)`` is raised; a full disk (ENOSPC, EDQUOT)
    raises ``disk_full(reason)``. Whatever stops the stream removes the temporary file."""
    out = await asyncio.to_thread(open, tmp, "wb")
    writer = HashedWriter(out)
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            size = writer.size + len(chunk)
            if limit is not None and size > limit:
                raise too_big(size)
            await writer.write(chunk)
        size = writer.size
        digest = await writer.finish()
        await asyncio.to_thread(os.replace, tmp, dest(digest))
    except OSError as exc:
        out.close()
        tmp.unlink(missing_ok=True)
        if exc.errno in (28, 122):  # ENOSPC, EDQUOT: the disk, not the request
            raise disk_full(exc.strerror or "no space") from None
        raise
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    return digest, size
