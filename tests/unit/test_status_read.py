"""The status read (``ServiceManager.read``, one statement outside the ORM) says what the ORM's
service says, on SQLite too (``mmanager dev``'s database), and only to whom may see it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hub.app import build_hub
from hub.config import HubSettings
from hub.errors import NotFound
from hub.models import Base, ServiceModel, UserModel
from hub.services.lifecycle.reads import Rendered
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
            expected = await hub.services.out(await session.get(ServiceModel, sid))

        read = await hub.services.read(Identity(alice_id, "alice", False, datetime.now(UTC)), sid)
        assert read == expected
        as_json = await hub.services.read_json(Identity(alice_id, "alice", False, datetime.now(UTC)), sid)
        assert as_json == expected.model_dump_json().encode()
        assert read.owner == "alice" and read.url == "http://127.0.0.1:32001" and read.spec["env"] == {"A": "1"}
        admin = Identity(99, "root", True, datetime.now(UTC))
        assert await hub.services.read(admin, sid) == expected
        for who, what in ((Identity(bob_id, "bob", False, datetime.now(UTC)), sid), (admin, "no-such-service")):
            for read_it in (hub.services.read, hub.services.read_json):
                with pytest.raises(NotFound) as refused:
                    await read_it(who, what)
                assert refused.value.code == "SERVICE_NOT_FOUND"
    finally:
        await db.dispose()


def test_an_answer_is_rendered_again_only_when_its_row_changed() -> None:
    renders: list[str] = []

    def render(text: str) -> Callable[[], bytes]:
        def it() -> bytes:
            renders.append(text)
            return text.encode()
        return it

    rendered = Rendered(most=2)
    row = {"id": "a", "status": "running", "spec": {"env": {"A": "1"}}}
    assert rendered.get("a", row, render("a1")) == b"a1"
    assert rendered.get("a", row, render("unused")) == b"a1"  # the same row
    assert rendered.get("a", {**row, "spec": {"env": {"A": "1"}}}, render("unused")) == b"a1"  # an equal one
    assert rendered.get("a", {**row, "spec": {"env": {"A": "2"}}}, render("a2")) == b"a2"  # changed deep inside
    assert rendered.get("a", {**row, "status": "stopped"}, render("a3")) == b"a3"
    assert renders == ["a1", "a2", "a3"]
    # Two keys kept at most: a third pushes out the one kept longest.
    rendered.get("b", {"id": "b"}, render("b1"))
    rendered.get("c", {"id": "c"}, render("c1"))
    assert rendered.get("a", {**row, "status": "stopped"}, render("a4")) == b"a4"
    assert rendered.get("c", {"id": "c"}, render("unused")) == b"c1"
    assert renders == ["a1", "a2", "a3", "b1", "c1", "a4"]
