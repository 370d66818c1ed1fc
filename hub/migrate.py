"""Running the alembic migrations from code (``mmanager db upgrade``, the
hub's start-up, the tests), and work on a database migrated first (the CLI's
database commands, the tests' labs)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config

from hub.db import Database

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking; call it from a thread when an event loop is running."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def on_migrated(url: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """Migrate the database at ``url`` to head, then run ``work(session)`` in one transaction on it. Blocking,
    with an event loop of its own: not from a thread that runs one."""
    upgrade(url)

    async def run() -> T:
        db = Database(url)
        try:
            async with db.session() as session:
                return await work(session)
        finally:
            await db.dispose()

    return asyncio.run(run())
