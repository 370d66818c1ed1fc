"""The hub's own usage alerts (``AlertModel``, ``GET /api/admin/alerts``) as Alertmanager alerts, and their
delivery to Alertmanager's API (``POST /api/v2/alerts``), so they reach the same receivers (a webhook, email)
as Prometheus's.

What is sent is a pure function of the stored alerts and the time (``postable()``). Alertmanager knows an
alert by its labels, so its labels (``labels()``) are its key here too, and per key only the newest alert
is sent: an open one and an older resolved one of the same key would overwrite each other at every send. An open alert is sent with an end ``hold`` seconds ahead, renewed at each send, so it resolves
by itself when no hub sends any more; a resolved one with its resolution time as its end, re-sent for
``RESOLVED_KEEP`` seconds (as Prometheus keeps resolved alerts), so that a send that failed, or a leader that
changed meanwhile, still delivers the resolution.

Invariant: delivery never raises and never waits longer than ``TIMEOUT`` per Alertmanager; a failure is
logged when it starts, then at most once per ``LOG_EVERY`` seconds while it lasts, and once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, select

from hub.models import AlertModel

log = logging.getLogger(__name__)

ALERTNAME = "MManagerUsageHigh"
# Seconds a resolved alert is still sent after it resolved.
RESOLVED_KEEP = 15 * 60.0
# Seconds one Alertmanager may take to answer.
TIMEOUT = 10.0
# Seconds between two log lines about the same Alertmanager still failing.
LOG_EVERY = 300.0
WHAT = {"cpu": "CPU", "memory": "memory", "disk": "disk"}


def hold(interval: float) -> float:
    """How far ahead an open alert's end is put: four sends, as Prometheus does, and at least a minute,
    so that a leader changing hands does not resolve every open alert for a moment."""
    return max(4 * interval, 60.0)


def labels(alert: AlertModel) -> dict[str, str]:
    out = {"alertname": ALERTNAME, "kind": alert.kind, "controller": alert.controller_id, "severity": "warning"}
    # The same label names as the Prometheus series: `service` is the service's id, `container` its container's
    # name. A disk alert is about its controller only.
    if alert.service_id:
        out["service"] = alert.service_id
    if alert.container_name:
        out["container"] = alert.container_name
    return out


def summary(alert: AlertModel) -> str:
    where = f"container {alert.container_name} on controller {alert.controller_id}" if alert.container_name \
        else f"controller {alert.controller_id}"
    unit = " of one core" if alert.kind == "cpu" else ""
    return (f"{WHAT.get(alert.kind, alert.kind)} at {alert.value:g}%{unit} on {where} "
            f"(threshold {alert.threshold:g}%)")


def _rfc3339(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def postable(alerts: Iterable[AlertModel], now: datetime, interval: float) -> list[dict[str, Any]]:
    """The body of ``POST /api/v2/alerts`` for these stored alerts: per key the open one, else the newest
    resolved one (see the module's docstring)."""
    newest: dict[tuple[tuple[str, str], ...], AlertModel] = {}
    for alert in alerts:
        # The labels themselves: two alerts Alertmanager would take for one are one here (and two it tells
        # apart, two here), whatever ids the rows carry.
        key = tuple(sorted(labels(alert).items()))
        have = newest.get(key)
        if have is None or _rank(alert) > _rank(have):
            newest[key] = alert
    ends = now + timedelta(seconds=hold(interval))
    return [
        {
            "labels": labels(alert),
            "annotations": {
                "summary": summary(alert),
                "description": (f"The hub's {alert.kind} alert {alert.id}: see GET /api/admin/alerts and "
                                "docs/OPERATIONS.md#monitoring-metrics-thresholds-and-history."),
                "alert_id": alert.id,
                "value": f"{alert.value:g}",
                "threshold": f"{alert.threshold:g}",
            },
            "startsAt": _rfc3339(alert.started_at),
            "endsAt": _rfc3339(alert.resolved_at or ends),
        }
        for _, alert in sorted(newest.items())
    ]


def _rank(alert: AlertModel) -> tuple[bool, datetime]:
    return alert.resolved_at is None, alert.resolved_at or alert.started_at


def to_send_query(now: datetime) -> Any:
    """The alerts open now, and those resolved in the last ``RESOLVED_KEEP`` seconds (both columns indexed)."""
    recent = now - timedelta(seconds=RESOLVED_KEEP)
    return select(AlertModel).where(or_(AlertModel.resolved_at.is_(None), AlertModel.resolved_at >= recent))


def where(url: str) -> str:
    """An Alertmanager's URL as logged: scheme, host and port, never the credentials a URL may carry."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


class Alertmanagers:
    """The Alertmanagers the hub pushes to: each gets every alert (the members of one cluster deduplicate)."""

    def __init__(self, urls: Sequence[str], transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.urls = list(urls)
        self._client = httpx.AsyncClient(timeout=TIMEOUT, transport=transport)
        # URL -> (when it started failing, when that was last logged).
        self._failing: dict[str, tuple[float, float]] = {}

    async def send(self, alerts: list[dict[str, Any]]) -> int:
        """Post ``alerts`` to each Alertmanager; how many took them."""
        results = await asyncio.gather(*(self._send_one(url, alerts) for url in self.urls))
        return sum(results)

    async def _send_one(self, url: str, alerts: list[dict[str, Any]]) -> bool:
        try:
            answer = await self._client.post(f"{url}/api/v2/alerts", json=alerts)
            problem = None if answer.is_success else f"it answered {answer.status_code}: {answer.text[:200]}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._note(url, problem, len(alerts))
        return problem is None

    def _note(self, url: str, problem: str | None, count: int) -> None:
        now = time.monotonic()
        failing = self._failing.get(url)
        if problem is None:
            if failing is not None:
                del self._failing[url]
                log.info("alertmanager %s takes alerts again (after %.0fs); %d sent", where(url), now - failing[0],
                         count)
            return
        if failing is None:
            self._failing[url] = (now, now)
            log.warning("alertmanager %s: %d alert(s) not sent, retried at the next round: %s", where(url), count,
                        problem)
        elif now - failing[1] >= LOG_EVERY:
            self._failing[url] = (failing[0], now)
            log.warning("alertmanager %s still takes no alerts (for %.0fs): %s", where(url), now - failing[0],
                        problem)

    async def aclose(self) -> None:
        await self._client.aclose()
