"""Timestamps are stored as UTC whatever offset they arrive with, so a filter like
``?since=12:01+02:00`` means the same instant on SQLite (which keeps no offset) as on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select

from hub.db import Database
from hub.models import AuditModel, Base


async def test_an_offset_is_converted_not_dropped(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 't.db'}")
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all, tables=[AuditModel.__table__])
        async with db.session() as session:
            for minute in (0, 1, 2):
                session.add(AuditModel(at=datetime(2026, 11, 23, 10, minute, tzinfo=UTC), actor=f"m{minute}",
                                       method="POST", path="/x", status_code=201, result="ok"))
        plus_two, minus_five = timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))
        for since in (datetime(2026, 11, 23, 12, 1, tzinfo=plus_two), datetime(2026, 11, 23, 5, 1, tzinfo=minus_five)):
            async with db.session() as session:
                rows = (await session.scalars(select(AuditModel).where(AuditModel.at >= since)
                                              .order_by(AuditModel.at))).all()
            assert [r.actor for r in rows] == ["m1", "m2"], since
            assert rows[0].at == datetime(2026, 11, 23, 10, 1, tzinfo=UTC)
    finally:
        await db.dispose()
