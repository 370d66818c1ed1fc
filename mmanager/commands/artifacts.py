"""``mmanager artifacts upload|list|show|download|delete``: the hub's artifacts over its API: files uploaded
as jobs' inputs, and jobs' outputs.

Invariant: an upload streams the file as it is sent and prints the artifact's id alone on stdout (what
``jobs run --input`` and a spec's ``inputs`` name); a download lands whole and checked against its
sha256, or not at all, and prints the path it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mmanager.commands import render
from mmanager.commands.model_files import _byte_bar
from mmanager.commands.render import escape
from mmanager.commands.session import Json, Profile, connect, note, show, stdout

app = typer.Typer(help="Artifacts: files uploaded as jobs' inputs, and jobs' outputs.", no_args_is_help=True)

ArtifactId = Annotated[str, typer.Argument(help="the artifact's id (artifacts list, jobs artifacts)",
                                           show_default=False)]


@app.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(help="the file to upload", exists=True, dir_okay=False, readable=True,
                                         show_default=False)],
    name: Annotated[str | None, typer.Option(help="its name (default: the file's), where a job finds it "
                                                  "under /inputs")] = None,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Upload a file as an artifact and print its id, for a job's inputs."""
    with connect(profile) as client, _byte_bar(json_out, f"upload {path.name}") as bar:
        row = client.artifacts.upload(path, name=name, progress=bar)
    if json_out:
        render.print_json(row)
        return
    print(row.id)
    note(f"{escape(row.path)}: {render.size(row.size)} stored; in a job: inputs: {escape(f'[{row.id}]')} (mounted at "
         f"/inputs/{escape(row.path)})")


@app.command("list")
def list_artifacts(
    job: Annotated[str | None, typer.Option(help="only this job's outputs (its id)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List your artifacts: uploads and jobs' outputs."""
    with connect(profile) as client:
        rows = client.artifacts.list(job_id=job, limit=limit, offset=offset)
    show(json_out, rows, render.artifacts)


@app.command("show")
def show_artifact(artifact_id: ArtifactId, json_out: Json = False, profile: Profile = None) -> None:
    """One artifact's record."""
    with connect(profile) as client:
        row = client.artifacts.get(artifact_id)
    show(json_out, row, lambda console, a: render.fields(console, [
        ("id", a.id), ("path", a.path), ("size", render.size(a.size)), ("sha256", a.sha256), ("owner", a.owner),
        ("job", a.job_id), ("attempt", a.attempt), ("created", a.created_at)]))


@app.command("download")
def download(
    artifact_id: ArtifactId,
    out: Annotated[Path, typer.Option("--out", "-o", help="the file to write, or a folder (default: here, under "
                                                          "its name)")] = Path("."),
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Save an artifact, checked against its sha256, and print the path written."""
    with connect(profile) as client, _byte_bar(json_out, f"download {artifact_id}") as bar:
        saved = client.artifacts.download(artifact_id, out, progress=bar)
    if json_out:
        render.print_json({"id": artifact_id, "path": str(saved)})
    else:
        print(saved)


@app.command("delete")
def delete(artifact_id: ArtifactId, json_out: Json = False, profile: Profile = None) -> None:
    """Remove an upload of yours (refused while a waiting or running job names it)."""
    with connect(profile) as client:
        client.artifacts.delete(artifact_id)
    if json_out:
        render.print_json({"id": artifact_id, "deleted": True})
    else:
        stdout().print(f"{escape(artifact_id)}: deleted")
