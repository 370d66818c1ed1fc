"""The audit log: what the hub's ``AuditMiddleware`` saw, and what controllers ship with heartbeats.

``audit_log`` is append-only (database triggers refuse UPDATE and DELETE);
this module only inserts and reads. The hub's own events are written one
transaction each, after the call's own transaction committed and before the
answer's last byte goes out. When the database refuses one (down,
restarting) the event goes to the ``mmanager.audit`` log as one JSON line
instead; one it has not taken within ``WRITE_BUDGET`` seconds is not waited
for any longer. Either way the call is answered as it would have been:
auditing never fails or hangs a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from hub.db import Database, insert_values
from hub.models import AuditModel
from mmanager.audit import WIDTHS, clean_event, clean_text, event_line, result_of
from mmanager.wire import AuditEvent

log = logging.getLogger("mmanager.audit")

HUB = "hub"
# Seconds one event may wait for the database before it goes to the log instead.
WRITE_BUDGET = 3.0
# A controller event's details are kept when their JSON is at most this long.
MAX_DETAILS = 4096
# Successful heartbeats are not audited: one every 2 s per controller would drown everything else.
# Refused ones are (a wrong key, a body that is not a heartbeat).
HEARTBEAT_PATH = re.compile(r"^/api/controllers/[^/]+/heartbeat$")
PRESENCE_PATH = re.compile(r"^/api/controllers/[^/]+/presence$")
# The calls controllers make all the time: heartbeats and presence streams (each stream's end is a call's end).
_ROUTINE_PATH = re.compile(r"^/api/controllers/[^/]+/(?:heartbeat|presence)$")
_AUDIT = AuditModel.__table__


# The answer to a call whose caller went away before its request was read (nginx's number): it reaches
# nobody, and nothing was done.
CLIENT_CLOSED = 499


def skip_routine(method: str, path: str, status: int) -> bool:
    """Calls with no audit row: heartbeats and presence streams that succeed or that a busy hub refused (503:
    shed, the database unavailable or the replica shutting down; counted in ``mmanager_heartbeats_shed_total``,
    and beaten again), and calls whose caller went away before anything was done (an overloaded hub's callers
    giving up, or beats it sheds, must not cost it a write each; a presence stream whose controller died is
    the controller's mark, not an audit row)."""
    return status == CLIENT_CLOSED or ((status < 400 or status == 503) and _ROUTINE_PATH.match(path) is not None)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _row(event: AuditEvent, source: str) -> dict[str, Any]:
    """The table's columns, cleaned and cut to their widths (``clean_event``) whoever made the event:
    a controller's events are not trusted to fit, nor to be free of NUL characters."""
    event = clean_event(event)
    details = event.details
    if len(json.dumps(details, default=str)) > MAX_DETAILS:
        details = {"truncated": True}
    return {
        "at": _utc(event.at),
        "source": clean_text(source, WIDTHS["source"]),
        "actor": event.actor,
        "method": event.method,
        "path": event.path,
        "target": event.target,
        "status_code": event.status_code,
        "result": result_of(event.status_code),
        "error_code": event.error_code,
        "remote": event.remote,
        "details": details,
    }


async def insert_events(session: AsyncSession, events: Sequence[AuditEvent], source: str) -> None:
    if events:
        await session.execute(insert(AuditModel), [_row(e, source) for e in events])


async def insert_shipped(session: AsyncSession, events: Sequence[AuditEvent], source: str) -> None:
    """A controller's events, inside the transaction of the heartbeat that carried them, without ever
    failing it: they go in under a SAVEPOINT, and when the database refuses them (anything a controller
    could send that the cleaning let through: a status code out of range, a date out of bounds) only
    the savepoint is rolled back and one event in their place (the first one's method, path and status,
    ``error_code`` AUDIT_REJECTED) says how many were rejected and why.
    The heartbeat goes on either way, and the controller drops the events it was answered for.
    """
    if not events:
        return
    try:
        async with session.begin_nested():
            await insert_events(session, events, source)
        return
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        log.warning("audit: the database refused %d event(s) shipped by %s (%s); recording one event in their "
                    "place", len(events), source, reason)
    first = events[0]
    placeholder = AuditEvent(at=datetime.now(UTC), actor=source, method=first.method, path=first.path,
                             status_code=first.status_code if 100 <= first.status_code <= 599 else 500,
                             error_code="AUDIT_REJECTED", details={"rejected": len(events), "reason": reason})
    try:
        async with session.begin_nested():
            await insert_events(session, [placeholder], source)
    except Exception as exc:
        log.warning("audit: the placeholder for %d rejected event(s) of %s was refused too (%s: %s)",
                    len(events), source, type(exc).__name__, exc)


def controller_source(controller_id: str) -> str:
    return f"controller:{controller_id}"


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Writes that outlived WRITE_BUDGET: they finish (or log their event) on their own.
        self._late: set[asyncio.Task[None]] = set()

    async def record(self, event: AuditEvent) -> None:
        """Write one of the hub's own events; never raises (the call it describes goes on regardless).

        The write is waited for at most ``WRITE_BUDGET`` seconds and never cancelled: a cancelled
        SQLite write would hold its connection's thread as long as a finished one, and a slow
        PostgreSQL one may still commit.
        """
        write = asyncio.ensure_future(self._write(event))
        done, _ = await asyncio.wait({write}, timeout=WRITE_BUDGET)
        if not done:
            self._late.add(write)
            write.add_done_callback(self._late.discard)
            log.warning("the database has not taken an audit event within %g s; answering without waiting "
                        "(the event is logged here if the write fails)", WRITE_BUDGET)

    async def _write(self, event: AuditEvent) -> None:
        try:
            await insert_values(self.db, _AUDIT, _row(event, HUB))  # one statement, committed by itself
        except Exception as exc:
            log.warning("audit event not written to the database (%s: %s): %s", type(exc).__name__, exc,
                        event_line(event, source=HUB))


def audit_query(*, actor: str | None = None, result: str | None = None, source: str | None = None,
                method: str | None = None, since: datetime | None = None, target: str | None = None) -> Select[Any]:
    """Newest first; every filter is an exact match except ``since`` (at or after)."""
    query = select(AuditModel).order_by(AuditModel.at.desc(), AuditModel.id.desc())
    for column, value in ((AuditModel.actor, actor), (AuditModel.result, result), (AuditModel.source, source),
                          (AuditModel.method, method.upper() if method else None), (AuditModel.target, target)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditModel.at >= _utc(since))
    return query

