"""A database outage in the hub's log (hub.outage): one WARNING when it starts, one INFO with its length when
it ends, and no ERROR or traceback, however many loops fail meanwhile. An in-process hub, its loops running,
on a PostgreSQL cluster of its own that the test stops for about two seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest

from hub.app import create_app
from hub.config import HubSettings
from hub.migrate import upgrade
from hub.services.users import create_user
from tests.hub.conftest import KEY
from tests.hub.test_failure_handling import heartbeat
from tests.support.pg import create_database, local_cluster
from tests.support.poll import eventually

OUTAGE = 2.0


class Lines(logging.Handler):
    """Every record at INFO or above, from the moment it is installed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def matching(self, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if text in r.getMessage()]


@pytest.mark.postgres
async def test_an_outage_is_one_warning_when_it_starts_and_one_info_when_it_ends(tmp_path: Path) -> None:
    with local_cluster() as pg:
        url = await create_database(pg.url, "outage")
        await asyncio.to_thread(upgrade, url)
        settings = HubSettings(database_url=url, api_key=KEY, heartbeat_interval=0.5, heartbeat_grace=3,
                               model_store=tmp_path / "models", artifact_store=tmp_path / "artifacts")
        app = create_app(settings)
        hub = app.state.hub
        async with app.router.lifespan_context(app):
            async with hub.db.session() as session:
                _, token = await create_user(session, "admin", is_admin=True)
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub",
                                       headers={"Authorization": f"Bearer {token}"})
            await eventually(lambda: hub.reconciler is not None, 10, "this replica leading, every loop running")
            assert (await client.get("/api/services")).status_code == 200
            lines = Lines()
            root = logging.getLogger()
            root.addHandler(lines)
            level = root.level
            root.setLevel(logging.INFO)
            try:
                await asyncio.to_thread(pg.stop)
                down = time.monotonic()
                answer = await client.get("/api/services")
                assert answer.status_code == 503 and answer.json()["error"]["code"] == "DATABASE_UNAVAILABLE"
                # A new controller's beats: their batches cannot be written either.
                for _ in range(3):
                    beat = await client.post("/api/controllers/edge-1/heartbeat", headers={"Authorization": f"Bearer {KEY}"},
                                             json=heartbeat("edge-1", [], url="http://edge-1.test:8001/"))
                    assert beat.status_code == 503 and beat.json()["error"]["code"] == "DATABASE_UNAVAILABLE"
                await eventually(lambda: lines.matching("the database is unavailable"), 5, "the outage's WARNING")
                # The outage itself: every loop fails again and again meanwhile.
                await asyncio.sleep(OUTAGE - (time.monotonic() - down))
                await asyncio.to_thread(pg.start)
                await eventually(lambda: lines.matching("the database is available again"), 10, "the outage's INFO")
                await eventually(lambda: lines.matching(f"replica {hub.replica_id} leads"), 10, "leading again")
                assert (await client.get("/api/services")).status_code == 200
                # A few iterations of every loop after the end: none fails any more.
                await eventually(lambda: time.monotonic() - down > OUTAGE + 2, 5, "loops running after the end")
            finally:
                root.removeHandler(lines)
                root.setLevel(level)
                await client.aclose()
    said = [(r.levelname, r.name, r.getMessage()) for r in lines.records]
    assert not [r for r in lines.records if r.exc_info or r.levelno >= logging.ERROR], said
    warned, ended = lines.matching("the database is unavailable"), lines.matching("the database is available again")
    assert [r.levelname for r in warned] == ["WARNING"] and [r.levelname for r in ended] == ["INFO"], said
    lasted = float(ended[0].getMessage().split("after ")[1].split("s ")[0])
    assert OUTAGE - 1 <= lasted <= OUTAGE + 5, said
    # The only other warning: leadership lost, its lock gone with its connection (and taken again after).
    assert [r.getMessage() for r in lines.records if r.levelno == logging.WARNING] == [
        warned[0].getMessage(), f"replica {hub.replica_id} is no longer the leader"], said
    assert len(lines.matching(f"replica {hub.replica_id} leads")) == 1, said
