"""The status read (``ServiceManager.read``, one statement outside the ORM) says what the ORM's
service says, on SQLite too (``mmanager dev``'s database), and only to whom may see it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from hub.app import build_hub
from hub.config import HubSettings
from hub.errors import NotFound
from hub.models import Base, ServiceModel, UserModel
from hub.services.users import Identity


async def test_the_read_matches_the_orm_and_hides_other_users_services(tmp_path: Path) -> None:
    settings = HubSettings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}", api_key="k" * 32)
    hub = build_hub(settings)
    db = hub.db
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with db.session() as session:
            alice, bob = UserModel(username="alice"), UserModel(username="bob")
            session.add_all([alice, bob])
            await session.flush()
            service = ServiceModel(
                name="m", owner_id=alice.id, repo="lab", spec={"image": "x", "env": {"A": "1"}}, status="running",
                controller_id="c1", container_id="abc", epoch=3, health="healthy",
                endpoint={"host": "127.0.0.1", "ports": {"5000": 32001}},
                created_at=datetime(2026, 12, 3, 10, 0, tzinfo=UTC))
            session.add(service)
            await session.flush()
            sid, alice_id, bob_id = service.id, alice.id, bob.id
        async with db.session() as session:
            expected = hub.services.to_out(await session.get(ServiceModel, sid))

        read = await hub.services.read(Identity(alice_id, "alice", False, datetime.now(UTC)), sid)
        assert read == expected
        assert read.owner == "alice" and read.url == "http://127.0.0.1:32001" and read.spec["env"] == {"A": "1"}
        admin = Identity(99, "root", True, datetime.now(UTC))
        assert await hub.services.read(admin, sid) == expected
        for who, what in ((Identity(bob_id, "bob", False, datetime.now(UTC)), sid), (admin, "no-such-service")):
            with pytest.raises(NotFound) as refused:
                await hub.services.read(who, what)
            assert refused.value.code == "SERVICE_NOT_FOUND"
    finally:
        await db.dispose()
