"""A service's gateway traffic for ``GET /api/services/{id}/metrics``: the live gateways' latency
histograms (``mmanager_gateway_request_duration_seconds``, served at ``{metrics_url}/metrics/latency``),
read when asked, summed over the gateways and summarised per service and per replica.

The counts are totals since each gateway started (Prometheus, which scrapes the same histograms, has
the rates); the quantiles are estimated from the buckets as PromQL's ``histogram_quantile`` does. A
gateway that does not answer in time is named, not waited for.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from gateway.latency import METRIC, PATH
from hub.db import Database
from hub.models import GatewayModel, utcnow
from hub.services.gateway import GATEWAY_LIVE

HISTOGRAM = METRIC
LATENCY_PATH = PATH
QUANTILES = (0.5, 0.95, 0.99)
READ_TIMEOUT = 2.0


@dataclass
class _Series:
    """One replica's (or the whole service's) histogram: cumulative bucket counts by upper bound."""

    buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    by_class: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    total_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        requests = int(sum(self.by_class.values()))
        return {
            "requests": requests,
            "responses": {code: int(n) for code, n in sorted(self.by_class.items())},
            "errors_5xx": int(self.by_class.get("5xx", 0)),
            "latency_seconds": {f"p{round(q * 100)}": histogram_quantile(q, self.buckets) for q in QUANTILES},
            "mean_seconds": self.total_seconds / requests if requests else None,
        }


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram (upper bound -> count), interpolated linearly inside
    its bucket as PromQL does; None when it is empty. A quantile in the ``+Inf`` bucket is the largest
    finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def summarize(expositions: Iterable[Iterable[Metric]], service: str) -> dict[str, Any]:
    """The traffic of ``service`` (``owner/name``, the histogram's ``service`` label) in the gateways'
    expositions (each parsed: ``parse``): in all, and per replica."""
    whole = _Series()
    replicas: dict[str, _Series] = defaultdict(_Series)
    for families in expositions:
        for family in families:
            if family.name != HISTOGRAM:
                continue
            for sample in family.samples:
                labels = sample.labels
                if labels.get("service") != service:
                    continue
                replica = replicas[labels.get("replica", "")]
                if sample.name.endswith("_bucket"):
                    bound = float(labels["le"])
                    whole.buckets[bound] += sample.value
                    replica.buckets[bound] += sample.value
                elif sample.name.endswith("_count"):
                    code = labels.get("code", "")
                    whole.by_class[code] += sample.value
                    replica.by_class[code] += sample.value
                elif sample.name.endswith("_sum"):
                    whole.total_seconds += sample.value
                    replica.total_seconds += sample.value
    return {**whole.summary(),
            "replicas": [{"replica": name or None, **series.summary()} for name, series in sorted(replicas.items())]}


async def service_traffic(db: Database, owner: str, name: str) -> dict[str, Any]:
    """``summarize`` over every live gateway that says where it is scraped, read now."""
    async with db.session() as session:
        gateways = list(await session.scalars(
            select(GatewayModel).where(GatewayModel.last_seen_at >= utcnow() - GATEWAY_LIVE,
                                       GatewayModel.metrics_url.is_not(None)).order_by(GatewayModel.id)))
    async with httpx.AsyncClient(timeout=READ_TIMEOUT) as client:
        answers = await asyncio.gather(*(client.get((g.metrics_url or "").rstrip("/") + LATENCY_PATH)
                                         for g in gateways), return_exceptions=True)
    read, unreachable, parsed = [], [], []
    for gateway, answer in zip(gateways, answers, strict=True):
        families = parse(answer.text) if isinstance(answer, httpx.Response) and answer.status_code == 200 else None
        if families is None:
            unreachable.append(gateway.id)
        else:
            read.append(gateway.id)
            parsed.append(families)
    return {**summarize(parsed, f"{owner}/{name}"), "gateways": read, "unreachable_gateways": unreachable}


def parse(text: str) -> list[Metric] | None:
    """An exposition's metric families; None when it is not one."""
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        return None
