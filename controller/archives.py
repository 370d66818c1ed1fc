"""Build the tar streams that ``put_archive`` unpacks into a container.

Both kinds are unpacked at ``/`` with paths relative to it: Docker creates
missing parent directories on the way, so no shell is needed in the image.
"""

from __future__ import annotations

import base64
import binascii
import io
import posixpath
import tarfile
import zipfile

from controller.errors import InvalidRequest


def decode_base64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64") from None


def container_path(path: str) -> str:
    """An absolute, normalised path inside the container, never ``/`` itself."""
    if not path or not path.startswith("/"):
        raise InvalidRequest(f"container_path {path!r} must be absolute")
    normalised = posixpath.normpath(path)
    if normalised in ("/", "//"):
        raise InvalidRequest("container_path must not be the root directory")
    return normalised


def file_archive(target: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(target.lstrip("/"))
        info.size = len(content)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def directory_archive(target: str, archive: bytes) -> tuple[bytes, int, list[str]]:
    """Re-root an uploaded tar (any compression) or zip at ``target``; return it, its file count and the
    folders it makes or fills (relative to ``target``, those only implied by an entry's path included).

    GeoML-Hub sends ``tar.add(directory, arcname=basename(directory))``: one
    top-level folder standing for the target itself, whatever its name. So a
    lone top-level folder is unwrapped; loose entries go straight into
    ``target``.
    """
    entries = _read_entries(archive)
    root = tarfile.TarInfo(target.lstrip("/"))
    root.type, root.mode = tarfile.DIRTYPE, 0o755
    wrapper = _wrapper_folder(entries)
    if wrapper is not None:
        entries = [(name[len(wrapper) + 1 :], info, data) for name, info, data in entries if name != wrapper]
    buf = io.BytesIO()
    files = 0
    folders: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(root)
        for name, info, data in entries:
            parent = posixpath.dirname(name)
            while parent:
                folders.add(parent)
                parent = posixpath.dirname(parent)
            if info.isdir():
                folders.add(name)
            info.name = posixpath.join(root.name, name)
            if info.isreg():
                files += 1
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue(), files, sorted(folders)


def _wrapper_folder(entries: list[tuple[str, tarfile.TarInfo, bytes]]) -> str | None:
    """The one top-level folder everything sits in, if there is exactly one."""
    tops = {name.split("/", 1)[0] for name, _, _ in entries}
    if len(tops) != 1:
        return None
    top = tops.pop()
    nested = any(name != top for name, _, _ in entries)
    is_dir = any(name == top and info.isdir() for name, info, _ in entries)
    return top if nested or is_dir else None


def _read_entries(archive: bytes) -> list[tuple[str, tarfile.TarInfo, bytes]]:
    """(relative name, tar header, content) of every entry, names made safe."""
    if zipfile.is_zipfile(io.BytesIO(archive)):
        return _zip_entries(archive)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            entries = []
            for member in tar.getmembers():
                name = _safe_name(member.name)
                if name is None:
                    continue
                if member.isreg() or member.islnk():
                    extracted = tar.extractfile(member)
                    data = extracted.read() if extracted else b""
                    # A hard link's target may be left out or renamed by the re-rooting: store a copy.
                    member.type, member.size = tarfile.REGTYPE, len(data)
                elif member.isdir() or member.issym():
                    data = b""
                else:
                    # Devices and fifos have no place in a model directory.
                    continue
                entries.append((name, member, data))
            return entries
    except tarfile.TarError as exc:
        raise InvalidRequest(f"archive is neither a tar nor a zip file: {exc}") from None


def _zip_entries(archive: bytes) -> list[tuple[str, tarfile.TarInfo, bytes]]:
    entries = []
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            for item in zf.infolist():
                name = _safe_name(item.filename)
                if name is None:
                    continue
                info = tarfile.TarInfo(name)
                if item.is_dir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    data = b""
                else:
                    data = zf.read(item)
                    info.size = len(data)
                    info.mode = (item.external_attr >> 16) & 0o777 or 0o644
                entries.append((name, info, data))
    except zipfile.BadZipFile as exc:
        raise InvalidRequest(f"archive is not a readable zip file: {exc}") from None
    return entries


def _safe_name(name: str) -> str | None:
    """The entry's path relative to the archive root; None for the root itself."""
    normalised = posixpath.normpath("/" + name.replace("\\", "/")).lstrip("/")
    if normalised in ("", "."):
        return None
    return normalised
