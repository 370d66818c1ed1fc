"""``mmanager users list|show|disable|enable|delete|quota`` (admin, over the hub's API; they join the DB-direct
``users create`` of ``mmanager.cli``) and ``mmanager tokens list|create|revoke|rotate`` (the caller's own
tokens, or with ``--user`` any user's, as an admin).

Invariant: a token is printed once, on stdout's last line, when it is created or rotated; nothing else prints
one (the hub shows it only then).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from mmanager.commands import render
from mmanager.commands.session import Json, Profile, connect, fail, note, show, stdout

Username = Annotated[str, typer.Argument(help="the user's name", show_default=False)]
TokenId = Annotated[int, typer.Argument(help="the token's id (tokens list)", show_default=False)]
User = Annotated[str | None, typer.Option("--user", help="another user's tokens (admin)")]

tokens_app = typer.Typer(help="API tokens: your own, or with --user any user's (admin). A token is shown once, "
                              "when it is created or rotated.", no_args_is_help=True)


def list_users(json_out: Json = False, profile: Profile = None) -> None:
    """List the users: admin or not, disabled or not, their services, tokens and quotas (admin)."""
    with connect(profile) as client:
        rows = client.users.list()
    show(json_out, rows, render.users)


def show_user(username: Username, json_out: Json = False, profile: Profile = None) -> None:
    """One user, their quotas (own, in force) and what their services ask for (admin)."""
    with connect(profile) as client:
        row = client.users.get(username)
    show(json_out, row, render.user)


def disable_user(username: Username, json_out: Json = False, profile: Profile = None) -> None:
    """Refuse a user's tokens; their services keep running (admin)."""
    with connect(profile) as client:
        row = client.users.disable(username)
    show(json_out, row, render.user)


def enable_user(username: Username, json_out: Json = False, profile: Profile = None) -> None:
    """Accept a disabled user's tokens again (admin)."""
    with connect(profile) as client:
        row = client.users.enable(username)
    show(json_out, row, render.user)


def delete_user(
    username: Username,
    services: Annotated[str | None, typer.Option(
        "--services", help="what becomes of their services: delete, or transfer (with --to)")] = None,
    to: Annotated[str | None, typer.Option("--to", help="who receives their services (--services transfer)")] = None,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Delete a user, their services deleted or handed to --to, as --services says (admin)."""
    if services not in (None, "delete", "transfer"):
        fail("VALIDATION_ERROR", f"--services is delete or transfer, not {services!r}")
    choice: Literal["delete", "transfer"] | None = services  # type: ignore[assignment]
    with connect(profile) as client:
        done = client.users.delete(username, services=choice, to=to)
    if json_out:
        render.print_json(done)
        return
    what = (f"; services deleted: {', '.join(done.deleted)}" if done.deleted else "") + (
        f"; services transferred to {done.to}: {', '.join(done.transferred)}" if done.transferred else "")
    stdout().print(f"user [bold]{render.escape(done.username)}[/bold] deleted{render.escape(what)}")


def _quota(value: str | None) -> int | str | None:
    """A quota option: 'default' puts it back to the hub's default (None); a count or a size otherwise."""
    if value is None or value == "default":
        return None
    return int(value) if value.isdigit() else value


def set_quota(
    username: Username,
    services: Annotated[str | None, typer.Option(help="service replicas ('default': the hub's)")] = None,
    gpus: Annotated[str | None, typer.Option(help="GPUs ('default': the hub's)")] = None,
    memory: Annotated[str | None, typer.Option(help="memory, e.g. 16G ('default': the hub's)")] = None,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Set a user's quotas; those not given stay as they are (admin)."""
    given = {name: _quota(value) for name, value in (("services", services), ("gpus", gpus), ("memory", memory))
             if value is not None}
    if not given:
        fail("EMPTY_PATCH", "give --services, --gpus or --memory")
    with connect(profile) as client:
        row = client.users.set_quotas(username, **given)
    show(json_out, row, render.user)


def _created(json_out: bool, row: Any) -> None:
    if json_out:
        render.print_json(row)
        return
    render.fields(stdout(), [("id", row.id), ("name", row.name), ("prefix", row.prefix)])
    note("the token is shown this once: the hub keeps only its SHA-256. Store it now:")
    print(row.token)


@tokens_app.command("list")
def list_tokens(user: User = None, json_out: Json = False, profile: Profile = None) -> None:
    """Your tokens (their prefixes, never the tokens), revoked ones included."""
    with connect(profile) as client:
        rows = client.users.tokens(user) if user else client.tokens.list()
    show(json_out, rows, render.tokens)


@tokens_app.command("create")
def create_token(name: Annotated[str, typer.Option("--name", help="what to call it (laptop, ci)")],
                 user: User = None, json_out: Json = False, profile: Profile = None) -> None:
    """Make a token; it is printed this once, on the last line."""
    with connect(profile) as client:
        row = client.users.create_token(user, name) if user else client.tokens.create(name)
    _created(json_out, row)


@tokens_app.command("revoke")
def revoke_token(token_id: TokenId, user: User = None, profile: Profile = None) -> None:
    """Revoke a token: refused at once by the hub replica asked, by the others within seconds."""
    with connect(profile) as client:
        if user:
            client.users.revoke_token(user, token_id)
        else:
            client.tokens.revoke(token_id)
    note(f"token {token_id} revoked")


@tokens_app.command("rotate")
def rotate_token(token_id: TokenId, user: User = None, json_out: Json = False, profile: Profile = None) -> None:
    """A new token of the same name, the old one revoked; the new one is printed this once."""
    with connect(profile) as client:
        row = client.users.rotate_token(user, token_id) if user else client.tokens.rotate(token_id)
    _created(json_out, row)


def attach(group: typer.Typer) -> None:
    group.command("list")(list_users)
    group.command("show")(show_user)
    group.command("disable")(disable_user)
    group.command("enable")(enable_user)
    group.command("delete")(delete_user)
    group.command("quota")(set_quota)
