"""``mmanager login``: keep a hub's URL and a token as a profile of the client config
(``mmanager.client.config``), checked with ``GET /api/me`` before it is saved.

Invariant: a token that the hub refuses, a hub that cannot be reached, or a URL that is not an http(s) URL is
never saved; the token is never printed or echoed (asked hidden, or read from stdin).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mmanager.commands import render
from mmanager.commands.render import escape
from mmanager.commands.session import USAGE, Json, Profile, api_errors, fail, stdout


def login(
    url: Annotated[str | None, typer.Argument(
        help="the hub's URL, e.g. http://hub:8000 (default: MMANAGER_HUB_URL, else asked)", show_default=False)]
    = None,
    token: Annotated[str | None, typer.Option(
        help="the API token (default: read from stdin when it is not a terminal, else asked without echo); "
             "on the command line other local users see it (ps) and the shell's history keeps it: prefer "
             "stdin, mmanager login URL < tokenfile")] = None,
    profile: Profile = None,
    json_out: Json = False,
) -> None:
    """Log in to a hub: check the token with it, then save both as a profile (and make it the current one)."""
    from mmanager.client import Client, config

    url = url or os.environ.get("MMANAGER_HUB_URL") or (
        typer.prompt("Hub URL", err=True) if sys.stdin.isatty() else None)
    if not url:
        fail("USAGE", "no hub URL: give it (mmanager login http://hub:8000) or set MMANAGER_HUB_URL", USAGE)
    with api_errors():
        # Before the token is asked for: a URL no client can call is refused first.
        url = config.check_url(url.rstrip("/"), "hub URL")
    if token is None:
        token = (typer.prompt("Token", hide_input=True, err=True) if sys.stdin.isatty()
                 else sys.stdin.readline()).strip()
    if not token:
        fail("USAGE", "no token: give --token, pipe it on stdin, or type it when asked", USAGE)
    name = profile or "default"
    with api_errors():
        with Client(url=url, token=token) as client:
            me = client.me()
        try:
            config.save_profile(name, url, token, make_current=True)
        except OSError as exc:
            fail("CONFIG_UNWRITABLE", f"cannot write {config.path()}: {exc.strerror or exc}")
    if json_out:
        render.print_json({"url": url, "profile": name, "username": me.username, "admin": me.admin})
    else:
        stdout().print(f"logged in to {escape(url)} as [bold]{escape(me.username)}[/bold]"
                       f"{' (admin)' if me.admin else ''}; saved as profile {escape(name)!r}")


def logout(profile: Profile = None, json_out: Json = False) -> None:
    """Forget a login profile (default: the current one): its URL and token leave the config file. The token
    itself stays valid on the hub (an admin revokes tokens)."""
    from mmanager.client import config

    with api_errors():
        data = config.load()
        name = profile or data["current"]
        if name not in data["profiles"]:
            fail("PROFILE_NOT_FOUND", f"no login profile {name!r} in {config.path()}")
        del data["profiles"][name]
        if data["current"] == name:
            data["current"] = next(iter(data["profiles"]), config.DEFAULT_PROFILE)
        try:
            at = config.save(data)
        except OSError as exc:
            fail("CONFIG_UNWRITABLE", f"cannot write {config.path()}: {exc.strerror or exc}")
    if json_out:
        render.print_json({"profile": name, "removed": True, "current": data["current"]})
    else:
        stdout().print(f"logged out: profile {escape(name)!r} removed from {escape(str(at))}")
