"""``mmanager controllers list|show|enable|disable|drain``: the controllers over the hub's API (admin).

They join the DB-direct ``controllers key-*`` commands of ``mmanager.cli`` in one group (``attach``).
Invariant: drain waits for its operation with a progress bar, as every long operation does.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mmanager.commands import render
from mmanager.commands.render import escape
from mmanager.commands.session import Json, Profile, completions, connect, progress_bar, show, stdout


def _ids(ctx: typer.Context, incomplete: str) -> list[str]:
    return completions(ctx, incomplete, lambda c: [row.id for row in c.controllers.list()])


ControllerId = Annotated[str, typer.Argument(help="the controller's id", show_default=False, autocompletion=_ids)]


def list_controllers(json_out: Json = False, profile: Profile = None) -> None:
    """List the controllers: status, load, containers and GPUs (admin)."""
    with connect(profile) as client:
        rows = client.controllers.list()
    show(json_out, rows, render.controllers)


def show_controller(controller_id: ControllerId, json_out: Json = False, profile: Profile = None) -> None:
    """One controller, with its GPUs (admin)."""
    with connect(profile) as client:
        row = client.controllers.get(controller_id)
    show(json_out, row, render.controller)


def _said(json_out: bool, row: Any, what: str) -> None:
    if json_out:
        render.print_json(row)
    else:
        stdout().print(f"[bold]{escape(row.id)}[/bold]: {what}; status {render.status(row.status).markup}, "
                       f"{'enabled' if row.enabled else 'disabled'}")


def enable_controller(controller_id: ControllerId, json_out: Json = False, profile: Profile = None) -> None:
    """Let the hub place new services on a controller again (admin)."""
    with connect(profile) as client:
        row = client.controllers.enable(controller_id)
    _said(json_out, row, "enabled")


def disable_controller(controller_id: ControllerId, json_out: Json = False, profile: Profile = None) -> None:
    """Place nothing new on a controller; what runs there stays (admin)."""
    with connect(profile) as client:
        row = client.controllers.disable(controller_id)
    _said(json_out, row, "disabled")


def drain_controller(controller_id: ControllerId, json_out: Json = False, profile: Profile = None) -> None:
    """Disable a controller and move its services off, each new copy healthy before the old goes (admin)."""
    with connect(profile) as client, progress_bar(json_out, f"drain {controller_id}") as bar:
        row = client.controllers.drain(controller_id, progress=bar)
    _said(json_out, row, "drained")


def attach(group: typer.Typer) -> None:
    group.command("list")(list_controllers)
    group.command("show")(show_controller)
    group.command("enable")(enable_controller)
    group.command("disable")(disable_controller)
    group.command("drain")(drain_controller)
