"""Where a copy into a container lands, and the rule that a copy never removes what it did not name.

A file copy lands as ``docker cp`` lands a file: a ``container_path`` that is an existing folder takes the
file inside it (as ``file_name``); one that does not exist, or is a file, is the file's own path (GeoML-Hub's
convention, ``container_path=/app/data/x.csv`` with ``file_name=x.csv``); a trailing ``/`` or
``is_directory`` says "a folder" outright. A symbolic link there is followed once, as ``docker cp`` does.

Nothing is replaced but what the caller named: a file never takes a folder's place, a folder never takes a
file's (the folders on the way included), and a directory copy without ``remove_existing`` merges. Refusals
are ``PathConflict`` (409). Everything is read with the runtime's ``stat_path(s)`` (Docker's archive stat):
no exec, so a stopped container and an image without a shell work too. These checks come before anything is
written; ``noOverwriteDirNonDir`` on the write itself (``DockerRuntime.put_archive``) guards what changes in
between.
"""

from __future__ import annotations

import posixpath

from controller import archives
from controller.errors import InvalidRequest, PathConflict, PathIsDirectory
from controller.runtime import PathStat, Runtime
from controller.schemas import FileCopy


async def file_target(runtime: Runtime, container_id: str, body: FileCopy) -> str:
    """The path the file is written at."""
    raw = body.container_path
    if not raw.startswith("/"):
        raise InvalidRequest(f"container_path {raw!r} must be absolute")
    path = posixpath.normpath(raw)
    if body.is_directory or raw.endswith("/") or path in ("/", "//"):
        target = archives.container_path(posixpath.join(path, _plain(body.file_name)))
    else:
        path, found = await _follow(runtime, container_id, path)
        if found is not None and found.is_dir:
            if not body.file_name:
                raise PathIsDirectory(
                    f"{path} is a folder: give file_name to write the file inside it",
                    {"container_path": body.container_path},
                )
            target = archives.container_path(posixpath.join(path, _plain(body.file_name)))
        else:
            target = path
    target, there = await _follow(runtime, container_id, target)
    if there is not None and there.is_dir:
        raise PathIsDirectory(f"{target} is a folder; a file would replace it and all in it", {"path": target})
    await _parents_are_folders(runtime, container_id, target)
    return target


async def check_directory(
    runtime: Runtime, container_id: str, target: str, folders: list[str], *, remove_existing: bool
) -> None:
    """Refuse a directory copy that would turn a file into a folder: ``target``'s parents always, and without
    ``remove_existing`` (a merge) ``target`` itself and the archive's ``folders`` (relative to it) too."""
    await _parents_are_folders(runtime, container_id, target)
    if remove_existing:
        return
    # Shallowest first, one batch a level: under a folder that is not there nothing is, so an archive of
    # thousands of folders into a new place costs one look, not one (two Docker calls) per folder.
    by_depth: dict[int, list[str]] = {}
    for folder in folders:
        by_depth.setdefault(folder.count("/") + 1, []).append(folder)
    there: set[str] = set()  # the archive's folders (and "": target) that are folders in the container
    level = [""]
    for depth in range(max(by_depth, default=0) + 1):
        if depth:
            level = [folder for folder in by_depth.get(depth, []) if posixpath.dirname(folder) in there]
        if not level:
            return
        paths = [posixpath.join(target, folder) if folder else target for folder in level]
        found = await runtime.stat_paths(container_id, paths)
        for folder, path, stat in zip(level, paths, found, strict=True):
            if stat is not None and stat.is_link:
                _, stat = await _follow(runtime, container_id, path)
            if stat is not None and not stat.is_dir:
                raise PathConflict(f"{path} is a file; the copy would replace it with a folder", {"path": path})
            if stat is not None:
                there.add(folder)


def _plain(name: str | None) -> str:
    if not name or name in (".", "..") or "/" in name:
        raise InvalidRequest("file_name must be a plain file name when container_path is a folder")
    return name


async def _follow(runtime: Runtime, container_id: str, path: str) -> tuple[str, PathStat | None]:
    """``path``'s stat; for a symbolic link, its target's path and stat (one level, as ``docker cp``)."""
    found = await runtime.stat_path(container_id, path)
    if found is None or not found.is_link:
        return path, found
    # Docker answers the target made absolute; a relative one is kept relative to the link's folder.
    linked = posixpath.normpath(posixpath.join(posixpath.dirname(path), found.link_target))
    return linked, await runtime.stat_path(container_id, linked)


async def _parents_are_folders(runtime: Runtime, container_id: str, path: str) -> None:
    """The nearest existing folder on the way to ``path`` is a folder: Docker makes the missing ones, and
    would make one in a file's place (a file of the image's own layers is lost that way)."""
    parent = posixpath.dirname(path)
    while parent != "/":
        _, found = await _follow(runtime, container_id, parent)
        if found is not None:
            if not found.is_dir:
                raise PathConflict(f"{parent} is a file, not a folder", {"path": parent})
            return
        parent = posixpath.dirname(parent)
