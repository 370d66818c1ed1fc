"""``mmanager images list|pull|prune``: the images on the controllers' servers, over the hub's admin API.

Invariant: a pull or a prune prints each named controller's outcome and exits with status 1 when any
failed (one ``error: CODE: message`` line naming it); a registry password is read from a prompt or stdin,
never from the command line.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from mmanager.commands import render
from mmanager.commands.render import escape
from mmanager.commands.session import FAILED, USAGE, Json, Profile, completions, connect, fail, stdout

app = typer.Typer(help="Images on the controllers' servers: list, pull, prune (admin).", no_args_is_help=True)


def _ids(ctx: typer.Context, incomplete: str) -> list[str]:
    return completions(ctx, incomplete, lambda c: [row.id for row in c.controllers.list()])


Controllers = Annotated[list[str], typer.Option(
    "--controller", "-c", help="a controller to act on (repeat for several)", show_default=False,
    autocompletion=_ids)]


@app.command("list")
def list_images(
    controller: Annotated[str, typer.Argument(help="the controller's id", show_default=False, autocompletion=_ids)],
    json_out: Json = False, profile: Profile = None,
) -> None:
    """The images on a controller's server (exit status 1 when it cannot say)."""
    with connect(profile) as client:
        listed = client.images.list(controller)
    if json_out:
        render.print_json(listed)
    elif listed.ok:
        render.images(stdout(), listed.images)
    if not listed.ok:
        error = listed.error or {}
        fail(str(error.get("code") or "CONTROLLER_UNAVAILABLE"), f"{listed.controller_id}: {error.get('message', '')}")


def _password() -> str:
    if sys.stdin.isatty():
        return str(typer.prompt("Registry password", hide_input=True, err=True))
    return sys.stdin.readline().rstrip("\r\n")


@app.command("pull")
def pull(
    image: Annotated[str, typer.Argument(help="the image, e.g. registry.lab/team/model:1.2", show_default=False)],
    controllers: Controllers,
    registry_user: Annotated[str | None, typer.Option(
        help="log in to the registry as this user for this pull; the password is asked (hidden), or read from "
             "stdin when it is not a terminal")] = None,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Pull an image on each controller named, all at once, waiting until all are done (admin)."""
    auth = None
    if registry_user is not None:
        password = _password()
        if not password:
            fail("USAGE", "no registry password: type it when asked, or pipe it on stdin", USAGE)
        auth = {"username": registry_user, "password": password}
    with connect(profile) as client, _waiting(json_out, f"pulling {image} on {', '.join(controllers)}"):
        outcomes = client.images.pull(image, controllers, registry_auth=auth)
    _outcomes(json_out, outcomes, _pulled)


@app.command("prune")
def prune(controllers: Controllers, json_out: Json = False, profile: Profile = None) -> None:
    """Remove the unused images (untagged, used by no container) on each controller named (admin)."""
    with connect(profile) as client, _waiting(json_out, f"pruning on {', '.join(controllers)}"):
        outcomes = client.images.prune(controllers)
    _outcomes(json_out, outcomes, _pruned)


def _waiting(json_out: bool, label: str) -> Any:
    """A spinner on a terminal while the hub waits for the controllers (their answer is the only news)."""
    from contextlib import nullcontext

    if json_out or not sys.stdout.isatty():
        return nullcontext()
    return stdout().status(escape(label))


def _pulled(o: Any) -> str:
    image = o.image or {}
    size = render.size(image["size"]) if isinstance(image.get("size"), int) else None
    return "pulled " + ", ".join(str(v) for v in (image.get("id"), size) if v)


def _pruned(o: Any) -> str:
    return f"{len(o.images_deleted or [])} images removed, {render.size(o.space_reclaimed or 0)} reclaimed"


def _outcomes(json_out: bool, outcomes: list[Any], said: Any) -> None:
    if json_out:
        render.print_json(outcomes)
    else:
        render.table(stdout(), ("CONTROLLER", "OUTCOME", "DETAIL"),
                     ([o.controller_id, render.status("ok" if o.ok else "failed"),
                       said(o) if o.ok else f"{(o.error or {}).get('code')}: {(o.error or {}).get('message')}"]
                      for o in outcomes))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        first = failed[0].error or {}
        more = f" (and {len(failed) - 1} more controllers failed)" if len(failed) > 1 else ""
        fail(str(first.get("code") or "FAILED"), f"{failed[0].controller_id}: {first.get('message', '')}{more}",
             FAILED)
