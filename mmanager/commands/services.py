"""``mmanager services …``: a user's services (an admin's: everyone's) over the hub's API, by name or id.

Invariant: each command is one SDK call (two for ``delete``, which shows what it removes before asking);
the long ones (start, stop, restart, scale, migrate, rollback) wait for their operation with a progress bar.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from mmanager.commands import render
from mmanager.commands.render import escape
from mmanager.commands.session import USAGE, Json, Profile, completions, connect, fail, note, progress_bar, show, stdout

app = typer.Typer(help="Services: yours (an admin: everyone's), named by id or by the name of one of yours.",
                  no_args_is_help=True)


def _own_names(ctx: typer.Context, incomplete: str) -> list[str]:
    return completions(ctx, incomplete, lambda c: [s.name for s in c.services.list(owner=c.me().username, limit=1000)])


Ref = Annotated[str, typer.Argument(help="the service: its id, or the name of one of yours", show_default=False,
                                    autocompletion=_own_names)]


def done(json_out: bool, service: Any, what: str) -> None:
    """The one line a finished action prints, or the service's JSON."""
    if json_out:
        render.print_json(service)
        return
    stdout().print(f"[bold]{escape(service.name)}[/bold]: {escape(what)}; status {render.status(service.status).markup}"
                   f", replicas {render.replica_count(service)}, version {service.version}")


@app.command("list")
def list_services(
    name: Annotated[str | None, typer.Option(help="only the services of this name")] = None,
    owner: Annotated[str | None, typer.Option(help="only this user's (an admin's filter)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """List services."""
    with connect(profile) as client:
        rows = client.services.list(name=name, owner=owner, limit=limit, offset=offset)
    show(json_out, rows, render.services)


@app.command("status")
def status(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """A service's status, read live from its controllers, with its replicas."""
    with connect(profile) as client:
        service = client.services.status(ref)
    show(json_out, service, render.service)


@app.command("logs")
def logs(
    ref: Ref,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines until Ctrl-C")] = False,
    tail: Annotated[int, typer.Option(min=0, max=100_000, help="lines from the end")] = 100,
    replica: Annotated[str | None, typer.Option(help="a replica's id (services status); default the primary")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON: {\"logs\": text}; with -f one JSON string a line")]
    = False,
    profile: Profile = None,
) -> None:
    """A service's container logs."""
    with connect(profile) as client:
        if not follow:
            text = client.services.logs(ref, tail=tail, replica=replica)
            if json_out:
                render.print_json({"logs": text})
            else:
                sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
            return
        with client.services.follow_logs(ref, tail=tail, replica=replica) as lines:
            for line in lines:
                line = line.rstrip("\n")
                sys.stdout.write((json.dumps(line, ensure_ascii=False) if json_out else line) + "\n")
                sys.stdout.flush()


def _action(verb: str, past: str) -> Any:
    def command(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
        with connect(profile) as client, progress_bar(json_out, f"{verb} {ref}") as bar:
            service = getattr(client.services, verb)(ref, progress=bar)
        done(json_out, service, past)

    command.__doc__ = f"{verb.capitalize()} a service (every replica), waiting until it is done."
    return command


app.command("start")(_action("start", "started"))
app.command("stop")(_action("stop", "stopped"))
app.command("restart")(_action("restart", "restarted"))


@app.command("scale")
def scale(ref: Ref, replicas: Annotated[int, typer.Argument(min=1, help="the number of copies")],
          json_out: Json = False, profile: Profile = None) -> None:
    """Run REPLICAS copies of a service, spread over the controllers."""
    with connect(profile) as client, progress_bar(json_out, f"scale {ref}") as bar:
        service = client.services.scale(ref, replicas, progress=bar)
    done(json_out, service, f"scaled to {replicas}")


@app.command("migrate")
def migrate(
    ref: Ref,
    to: Annotated[str | None, typer.Option("--to", help="the controller to move to (default: the hub picks)")]
    = None,
    replica: Annotated[str | None, typer.Option(help="move only this replica (its id in services status)")] = None,
    leave_volumes: Annotated[bool, typer.Option(
        "--leave-volumes", help="move even though the service's volumes stay on the server it leaves")] = False,
    json_out: Json = False, profile: Profile = None,
) -> None:
    """Move a service (or one replica) to another controller; the new copy serves before the old goes (admin)."""
    with connect(profile) as client, progress_bar(json_out, f"migrate {ref}") as bar:
        service = client.services.migrate(ref, target=to, replica=replica, leave_volumes=leave_volumes,
                                          progress=bar)
    done(json_out, service, "migrated" + (f" to {to}" if to else ""))


@app.command("history")
def history(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """A service's deployed versions; * marks the current one."""
    with connect(profile) as client:
        rows = client.services.history(ref)
    show(json_out, rows, render.history)


@app.command("rollback")
def rollback(ref: Ref, version: Annotated[int, typer.Argument(min=1, help="the version to go back to")],
             json_out: Json = False, profile: Profile = None) -> None:
    """Deploy an earlier version's spec again, as a new version."""
    with connect(profile) as client, progress_bar(json_out, f"rollback {ref}") as bar:
        service = client.services.rollback(ref, version, progress=bar)
    done(json_out, service, f"rolled back to version {version}'s spec")


@app.command("delete")
def delete(ref: Ref, yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
           json_out: Json = False, profile: Profile = None) -> None:
    """Remove a service and its containers (asks first, unless --yes)."""
    import click

    with connect(profile) as client:
        service = client.services.get(ref)
        if not yes:
            try:
                sure = typer.confirm(f"Delete service {service.name} ({service.id}, owner {service.owner}) "
                                     "and its containers?", err=True)
            except click.exceptions.Abort:
                sure = False
            if not sure:
                if not sys.stdin.isatty():
                    print(file=sys.stderr)  # the answer read from a pipe was not echoed: end the question's line
                fail("NOT_CONFIRMED", f"service {service.name} not deleted (--yes deletes without asking)", USAGE)
        client.services.delete(service.id)
    if json_out:
        render.print_json({"id": service.id, "name": service.name, "deleted": True})
    else:
        stdout().print(f"[bold]{escape(service.name)}[/bold]: deleted")


keys_app = typer.Typer(help="A service's gateway keys: what callers of a private service send as "
                            "`Authorization: Bearer KEY`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def create_key(ref: Ref, name: Annotated[str | None, typer.Option(help="a name to tell the key by")] = None,
               json_out: Json = False, profile: Profile = None) -> None:
    """Make a key for a service's gateway route; the key is printed this once (the hub keeps only its hash)."""
    with connect(profile) as client:
        row = client.services.keys.create(ref, name=name)
    if json_out:
        render.print_json(row)
        return
    render.fields(stdout(), [("id", row.id), ("name", row.name), ("prefix", row.prefix), ("key", row.key)])
    note("the key is shown this once: the hub keeps only its SHA-256. Store it now; callers send it as "
         "Authorization: Bearer KEY")


@keys_app.command("list")
def list_keys(ref: Ref, json_out: Json = False, profile: Profile = None) -> None:
    """A service's keys (their prefixes, never the keys)."""
    with connect(profile) as client:
        rows = client.services.keys.list(ref)
    show(json_out, rows, render.service_keys)


@keys_app.command("delete")
def delete_key(ref: Ref, key_id: Annotated[str, typer.Argument(help="the key's id (services keys list)",
                                                                show_default=False)],
               json_out: Json = False, profile: Profile = None) -> None:
    """Revoke a service's key: the gateways refuse it within a second or so."""
    with connect(profile) as client:
        client.services.keys.delete(ref, key_id)
    if json_out:
        render.print_json({"service": ref, "id": key_id, "deleted": True})
    else:
        stdout().print(f"{escape(ref)}: key {escape(key_id)} revoked")
