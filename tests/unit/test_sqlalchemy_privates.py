"""The SQLAlchemy privates that ``hub.db_direct`` calls still exist and still do what it relies on.

SQLAlchemy is pinned to one minor version in pyproject.toml for them. When one of these tests fails after
an upgrade, re-check ``AsyncpgConnector._raw`` in hub/db_direct.py against the new version (how its
``Connection._handle_dbapi_exception`` invalidates the pool after a disconnect, and how the asyncio extension
calls the pool's synchronous methods) before moving the pin.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import Pool

RECHECK = (f"SQLAlchemy {sqlalchemy.__version__}: re-check AsyncpgConnector._raw in hub/db_direct.py, then the "
           "sqlalchemy pin in pyproject.toml")


def test_pool_invalidate_keeps_its_signature() -> None:
    invalidate = getattr(Pool, "_invalidate", None)
    assert callable(invalidate), f"Pool._invalidate is gone. {RECHECK}"
    params = list(inspect.signature(invalidate).parameters)
    assert params[:3] == ["self", "connection", "exception"], f"Pool._invalidate{params}: {RECHECK}"


def test_greenlet_spawn_keeps_its_signature() -> None:
    try:
        from sqlalchemy.util import greenlet_spawn
    except ImportError:
        pytest.fail(f"sqlalchemy.util.greenlet_spawn is gone. {RECHECK}")
    assert inspect.iscoroutinefunction(greenlet_spawn), f"greenlet_spawn is no longer a coroutine function. {RECHECK}"
    params = inspect.signature(greenlet_spawn).parameters
    assert list(params)[0] == "fn" and any(p.kind is p.VAR_POSITIONAL for p in params.values()), (
        f"greenlet_spawn{list(params)} no longer takes (fn, *args). {RECHECK}")


async def test_a_disconnect_replaces_the_pools_older_connections(tmp_path: Path) -> None:
    """What ``_raw`` does after a disconnect, on a driver that needs no server: the raw connection's
    ``driver_connection`` is the driver's own, and ``Pool._invalidate`` through ``greenlet_spawn`` closes the
    failed connection and has every connection opened before it replaced when next taken."""
    from sqlalchemy.util import greenlet_spawn

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}", pool_size=2, max_overflow=0)
    opened: list[Any] = []
    event.listen(engine.sync_engine, "connect", lambda dbapi, _record: opened.append(dbapi))
    try:
        failed = await engine.raw_connection()
        assert isinstance(failed.driver_connection, aiosqlite.Connection), (
            f"raw_connection().driver_connection is {type(failed.driver_connection)}, not the driver's. {RECHECK}")
        older = await engine.raw_connection()
        await greenlet_spawn(older.close)  # back in the pool, opened before the failure
        assert len(opened) == 2

        await greenlet_spawn(engine.sync_engine.pool._invalidate, failed, ConnectionError("cut"))
        assert not failed.is_valid, f"Pool._invalidate left the failed connection valid. {RECHECK}"

        first, second = await engine.raw_connection(), await engine.raw_connection()
        assert len(opened) == 4, (
            f"after Pool._invalidate the pool handed out a connection opened before it. {RECHECK}")
        for raw in (first, second):
            await greenlet_spawn(raw.close)
    finally:
        await engine.dispose()
