"""``mmanager alerts list``: usage thresholds crossed (a user's own services'; an admin's: all)."""

from __future__ import annotations

from typing import Annotated

import typer

from mmanager.commands import render
from mmanager.commands.session import Json, Profile, connect, show

app = typer.Typer(help="Alerts: a container's CPU, memory or disk use over its threshold.", no_args_is_help=True)


@app.command("list")
def list_alerts(
    active: Annotated[bool, typer.Option("--active", help="only the open ones")] = False,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List alerts."""
    with connect(profile) as client:
        rows = client.alerts.list(active=True if active else None)
    show(json_out, rows, render.alerts)
