"""``mmanager models files upload|list|delete``: the hub's model-file store over its API (any user; a
delete: the uploader's own files, an admin's any).

Invariant: an upload streams the file from disk as it is sent (never read whole into memory), with a byte
progress bar on a terminal only; its result on stdout is the digest alone, what a spec's ``models`` names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from mmanager.commands import render
from mmanager.commands.render import escape
from mmanager.commands.session import Json, Profile, connect, note, show, stdout

app = typer.Typer(help="Model files: the hub's store of files a spec's `models` mounts read-only, named by "
                       "their sha256 digest.", no_args_is_help=True)

Digest = Annotated[str, typer.Argument(help="the file's digest, sha256:<64 hex> (models files list)",
                                       show_default=False)]


@contextmanager
def _byte_bar(json_out: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """The upload's ``progress(done, total)``: a byte bar on a terminal; none with ``--json`` or a pipe."""
    if json_out or not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=stdout(), transient=True)
    task = bar.add_task(escape(label), total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


@app.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(help="the file to upload", exists=True, dir_okay=False, readable=True,
                                         show_default=False)],
    name: Annotated[str | None, typer.Option(help="its name in the store (default: its digest's hex); the "
                                                  "mount's default file name")] = None,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Upload a file to the hub's model-file store and print its digest, to name in a spec's `models`."""
    with connect(profile) as client, _byte_bar(json_out, f"upload {path.name}") as bar:
        row = client.model_files.upload(path, name=name, progress=bar)
    if json_out:
        render.print_json(row)
        return
    print(row.digest)
    note(f"{escape(row.name)}: {render.size(row.size)} stored; in a spec: models: "
         f"[{{digest: {escape(row.digest)}}}] (mounted at /app/models/{escape(row.name)} unless mount says)")


@app.command("list")
def list_files(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List the stored model files, oldest first."""
    with connect(profile) as client:
        rows = client.model_files.list(limit=limit, offset=offset)
    show(json_out, rows, render.model_files)


@app.command("delete")
def delete(digest: Digest, json_out: Json = False, profile: Profile = None) -> None:
    """Remove a model file of yours (an admin: any); refused while a service's spec or a model type names it."""
    with connect(profile) as client:
        client.model_files.delete(digest)
    if json_out:
        render.print_json({"digest": digest, "deleted": True})
    else:
        stdout().print(f"{escape(digest)}: deleted")
