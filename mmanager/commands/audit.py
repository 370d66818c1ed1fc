"""``mmanager audit list``: the audit log (a user sees the entries where they are the actor; an admin, all)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from mmanager.commands import render
from mmanager.commands.session import Json, Profile, connect, show

app = typer.Typer(help="The audit log: every change, and every call refused.", no_args_is_help=True)


@app.command("list")
def list_audit(
    actor: Annotated[str | None, typer.Option(help="who made the call")] = None,
    result: Annotated[str | None, typer.Option(help="ok, refused or error")] = None,
    source: Annotated[str | None, typer.Option(help="hub, or controller:<id>")] = None,
    method: Annotated[str | None, typer.Option(help="POST, PATCH, DELETE, ...")] = None,
    since: Annotated[datetime | None, typer.Option(help="from this time on (UTC unless a zone is given)")] = None,
    target: Annotated[str | None, typer.Option(help="the service, controller or user acted on")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List audit entries, newest first."""
    with connect(profile) as client:
        rows = client.audit.list(actor=actor, result=result, source=source, method=method, since=since,
                                 target=target, limit=limit, offset=offset)
    show(json_out, rows, render.audit)
