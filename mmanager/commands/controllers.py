"""``mmanager controllers list|show|enable|disable|drain|update|delete``: the controllers over the hub's API
(admin).

They join the DB-direct ``controllers key-*`` commands of ``mmanager.cli`` in one group (``attach``).
Invariant: drain waits for its operation with a progress bar, as every long operation does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from mmanager.commands import render
from mmanager.commands.render import escape
from mmanager.commands.session import (
    USAGE,
    Json,
    Profile,
    completions,
    connect,
    fail,
    progress_bar,
    show,
    stdout,
)


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


def update_controller(
    controller_id: ControllerId,
    priority: Annotated[int | None, typer.Option(min=0, max=1000, help="its tier: the smallest placeable wins")] = None,
    weight: Annotated[int | None, typer.Option(min=1, max=10000, help="its share within its tier")] = None,
    max_containers: Annotated[int | None, typer.Option(
        min=1, max=100_000, help="place at most this many there (below its own MAX_CONTAINERS)")] = None,
    no_cap: Annotated[bool, typer.Option("--no-cap", help="lift the --max-containers cap")] = False,
    server_type: Annotated[Literal["gpu", "cpu", "edge"] | None, typer.Option(help="gpu, cpu or edge")] = None,
    url: Annotated[str | None, typer.Option(help="where the hub reaches it, e.g. http://host:8001")] = None,
    json_out: Json = False,
    profile: Profile = None,
) -> None:
    """Change a controller's priority, weight, cap, type or URL; the next placement uses them (admin)."""
    if max_containers is not None and no_cap:
        fail("USAGE", "--max-containers and --no-cap contradict each other", USAGE)
    changes: dict[str, Any] = {k: v for k, v in (("priority", priority), ("weight", weight),
                                                 ("max_containers", max_containers), ("server_type", server_type),
                                                 ("url", url)) if v is not None}
    if no_cap:
        changes["max_containers"] = None
    if not changes:
        fail("USAGE", "name something to change: --priority, --weight, --max-containers, --no-cap, --server-type "
                      "or --url", USAGE)
    with connect(profile) as client:
        row = client.controllers.update(controller_id, **changes)
    _said(json_out, row, "updated: " + ", ".join(f"{k} {'none' if v is None else v}" for k, v in changes.items()))


def delete_controller(
    controller_id: ControllerId,
    drain: Annotated[bool, typer.Option("--drain", help="move its services off first, then delete it")] = False,
    profile: Profile = None,
) -> None:
    """Delete a controller; refused while it holds services, unless --drain (admin). Its history stays."""
    with connect(profile) as client:
        if drain:
            with progress_bar(False, f"drain {controller_id}") as bar:
                client.controllers.drain(controller_id, progress=bar)
        client.controllers.delete(controller_id)
    stdout().print(f"[bold]{escape(controller_id)}[/bold]: deleted")


def attach(group: typer.Typer) -> None:
    group.command("list")(list_controllers)
    group.command("show")(show_controller)
    group.command("enable")(enable_controller)
    group.command("disable")(disable_controller)
    group.command("drain")(drain_controller)
    group.command("update")(update_controller)
    group.command("delete")(delete_controller)
