"""Several hub replicas on one database: every replica serves the API, one runs the loops.

Leadership is a PostgreSQL session-level advisory lock held on a connection
of its own: when the leader dies, PostgreSQL drops its connection and the
lock with it, and the next replica to try takes it (within one supervisor
tick). On SQLite (one process, dev mode) the only replica is the leader.

Each replica also keeps a row in ``hub_replicas`` fresh, so that operations a
dead replica left running can be recognised and recovered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime

from sqlalchemy import bindparam, delete, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from hub.db import Database, insert_row
from hub.models import HubReplicaModel, utcnow
from mmanager.loops import LoopService

log = logging.getLogger(__name__)

# "mmanager" folded into a 63-bit key; any constant would do as long as every replica agrees.
# Seconds the leader waits for its lock connection to answer before it steps down.
CHECK_TIMEOUT = 5.0
ADVISORY_LOCK_KEY = 0x6D6D616E61676572 & 0x7FFFFFFFFFFFFFFF


# A replica's beat (every supervisor tick), built once.
_BEAT = (update(HubReplicaModel.__table__).where(HubReplicaModel.__table__.c.id == bindparam("replica_id"))
         .values(last_seen_at=bindparam("now"), is_leader=bindparam("leading")))


class Leadership:
    def __init__(self, db: Database, expected: Callable[[BaseException], bool] | None = None) -> None:
        self.db = db
        # True for a failure accounted for elsewhere (the database away: hub.outage), not logged here.
        self.expected = expected or (lambda _: False)
        self._conn: AsyncConnection | None = None

    @property
    def held(self) -> bool:
        return self.db.is_sqlite or self._conn is not None

    async def try_acquire(self) -> bool:
        if self.db.is_sqlite:
            return True
        if self._conn is not None:
            return await self.check()
        conn = await self.db.engine.connect()
        try:
            got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})).scalar()
            await conn.commit()
        except Exception:
            await _close_quietly(conn)
            raise
        if got:
            # A half-open connection must not keep the lock (and so the loops) hostage: the server
            # probes it and drops it, releasing the lock, within half a minute.
            for setting in ("tcp_keepalives_idle = 10", "tcp_keepalives_interval = 5", "tcp_keepalives_count = 3"):
                await conn.execute(text(f"SET {setting}"))
            await conn.commit()
            self._conn = conn
            return True
        await _close_quietly(conn)
        return False

    async def check(self) -> bool:
        """Is the lock still ours? A broken connection means it is not."""
        if self.db.is_sqlite:
            return True
        if self._conn is None:
            return False
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await self._conn.execute(text("SELECT 1"))
                await self._conn.commit()
            return True
        except Exception as exc:
            if not self.expected(exc):
                log.warning("lost the leader lock's connection: %s", exc)
            conn, self._conn = self._conn, None
            await _close_quietly(conn, invalidate=True)
            return False

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
            await conn.commit()
        except Exception:
            pass
        await _close_quietly(conn)


async def _close_quietly(conn: AsyncConnection, invalidate: bool = False) -> None:
    try:
        if invalidate:
            await conn.invalidate()
        await conn.close()
    except Exception:
        pass


class Supervisor(LoopService):
    """Keeps this replica's row fresh, and runs ``on_lead``/``on_follow`` as leadership comes and goes."""

    name = "hub-supervisor"

    def __init__(self, db: Database, replica_id: str, interval: float,
                 on_lead: Callable[[datetime], Awaitable[None]], on_follow: Callable[[], Awaitable[None]],
                 on_beat: Callable[[], Awaitable[object]] | None = None) -> None:
        super().__init__(interval, jitter=0.05)
        self.db = db
        self.replica_id = replica_id
        self.leadership = Leadership(db, self.expected)
        self.on_lead = on_lead
        self.on_follow = on_follow
        self.on_beat = on_beat
        self.leading = False

    async def run_once(self) -> None:
        if self.leading:
            if not await self.leadership.check():
                self.leading = False
                log.warning("replica %s is no longer the leader", self.replica_id)
                await self.on_follow()
        else:
            try:
                acquired = await self.leadership.try_acquire()
            except Exception as exc:
                if not self.expected(exc):
                    log.warning("could not try for leadership: %s", exc)
                acquired = False
            if acquired:
                self.leading = True
                log.info("replica %s leads: it runs failure detection, failover and reconciliation", self.replica_id)
                await self.on_lead(utcnow())
        await self._beat()
        if self.on_beat is not None:
            await self.on_beat()

    async def _beat(self) -> None:
        now = utcnow()
        async with self.db.transaction() as tx:
            if not await tx.execute(_BEAT, {"replica_id": self.replica_id, "now": now, "leading": self.leading}):
                await insert_row(tx, HubReplicaModel(id=self.replica_id, hostname=socket.gethostname(), pid=os.getpid(),
                                                     is_leader=self.leading, started_at=now, last_seen_at=now))

    async def stop(self) -> None:
        await super().stop()
        if self.leading:
            self.leading = False
            await self.on_follow()
        await self.leadership.release()
        try:
            async with self.db.session() as session:
                await session.execute(delete(HubReplicaModel).where(HubReplicaModel.id == self.replica_id))
        except Exception as exc:
            log.warning("could not remove this replica's row: %s", exc)
