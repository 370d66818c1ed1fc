"""``mmanager operations list|show|wait``: the hub's record of what it did to services and controllers
(a user sees their own services' operations; an admin sees all)."""

from __future__ import annotations

from typing import Annotated

import typer

from mmanager.commands import render
from mmanager.commands.session import Json, Profile, connect, fail, progress_bar, show

app = typer.Typer(help="Operations: what the hub did (create, update, scale, migrate, drain, failover, ...).",
                  no_args_is_help=True)
OperationId = Annotated[str, typer.Argument(help="the operation's id", show_default=False)]


@app.command("list")
def list_operations(
    service: Annotated[str | None, typer.Option(help="a service's id")] = None,
    controller: Annotated[str | None, typer.Option(help="a controller's id")] = None,
    status: Annotated[str | None, typer.Option(help="running, succeeded or failed")] = None,
    operation: Annotated[str | None, typer.Option(help="create, update, scale, migrate, drain, ...")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List operations, newest first."""
    with connect(profile) as client:
        rows = client.operations.list(service_id=service, controller_id=controller, status=status,
                                      operation=operation, limit=limit, offset=offset)
    show(json_out, rows, render.operations)


@app.command("show")
def show_operation(operation_id: OperationId, json_out: Json = False, profile: Profile = None) -> None:
    """One operation, with its details."""
    with connect(profile) as client:
        row = client.operations.get(operation_id)
    show(json_out, row, render.operation)


@app.command("wait")
def wait_operation(
    operation_id: OperationId,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait at most (default: no limit)")] = None,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Wait for an operation to end, with a progress bar; exit status 1 if it failed."""
    with connect(profile) as client, progress_bar(json_out, f"operation {operation_id}") as bar:
        row = client.operations.wait(operation_id, progress=bar, timeout=timeout)
    show(json_out, row, render.operation)
    if row.status == "failed":
        fail("OPERATION_FAILED", f"operation {row.id} ({row.operation}) failed: {row.error or 'no reason given'}")
