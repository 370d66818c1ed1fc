"""The CLI's unit tests' harness: a fake SDK client put where the commands get theirs
(``mmanager.commands.session.make_client``), and the CLI run in-process.

Invariant: a command under test talks only to the fake it was given; nothing reaches a hub.
"""

from __future__ import annotations

from typing import Self, TypeVar

import pytest
from typer.testing import CliRunner, Result

from mmanager.cli import app
from mmanager.commands import session


class FakeClientBase:
    """What the commands do with any client beyond its calls: open it in a ``with``."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


C = TypeVar("C", bound=FakeClientBase)


def use_client(monkeypatch: pytest.MonkeyPatch, client: C) -> C:
    """``client`` is what every command gets, for the test's length, whatever profile it names."""
    monkeypatch.setattr(session, "make_client", lambda profile: client)
    return client


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=stdin)
