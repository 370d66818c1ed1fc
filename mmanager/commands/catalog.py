"""``mmanager models list|show``: the model catalog over the hub's API (any user). They join the DB-direct
``models register`` of ``mmanager.cli`` in one group (``attach``)."""

from __future__ import annotations

from typing import Annotated

import typer

from mmanager.commands import render
from mmanager.commands.session import Json, Profile, connect, show


def list_models(json_out: Json = False, profile: Profile = None) -> None:
    """List the model types services can be made from (apply with `model: NAME`)."""
    with connect(profile) as client:
        rows = client.models.list()
    show(json_out, rows, render.models)


def show_model(name: Annotated[str, typer.Argument(help="the model type's name", show_default=False)],
               json_out: Json = False, profile: Profile = None) -> None:
    """One model type: the spec it fills in."""
    with connect(profile) as client:
        row = client.models.get(name)
    show(json_out, row, render.model)


def attach(group: typer.Typer) -> None:
    group.command("list")(list_models)
    group.command("show")(show_model)
