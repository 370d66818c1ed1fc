"""A service's gateway traffic for ``GET /api/services/{id}/metrics``: the live gateways' latency
histograms (``mmanager_gateway_request_duration_seconds``, served at ``{metrics_url}/metrics/latency``),
read when asked, summed over the gateways and summarised per service and per replica; and what the
traffic history (``hub.background.traffic_history``) stores per bucket: the increase of each series
between two reads (``increase``), summed per service (``per_service``).

The counts are totals since each gateway started (Prometheus, which scrapes the same histograms, has
the rates); the quantiles are estimated from the buckets as PromQL's ``histogram_quantile`` does. A
gateway that does not answer in time is named, not waited for. An increase is never negative: a series
that went down started again from zero (a gateway restarted or reloaded, or dropped an idle series),
and counts what it holds now, as PromQL's ``increase`` does.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
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


def _samples(families: Iterable[Metric]) -> Iterator[tuple[str, Mapping[str, str], float]]:
    """The histogram's samples in one exposition: (suffix: "bucket", "count" or "sum", labels, value)."""
    for family in families:
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            yield sample.name.rpartition("_")[2], sample.labels, sample.value


def summarize(expositions: Iterable[Iterable[Metric]], service: str) -> dict[str, Any]:
    """The traffic of ``service`` (``owner/name``, the histogram's ``service`` label) in the gateways'
    expositions (each parsed: ``parse``): in all, and per replica."""
    whole = _Series()
    replicas: dict[str, _Series] = defaultdict(_Series)
    for families in expositions:
        for suffix, labels, value in _samples(families):
            if labels.get("service") != service:
                continue
            replica = replicas[labels.get("replica", "")]
            if suffix == "bucket":
                bound = float(labels["le"])
                whole.buckets[bound] += value
                replica.buckets[bound] += value
            elif suffix == "count":
                code = labels.get("code", "")
                whole.by_class[code] += value
                replica.by_class[code] += value
            elif suffix == "sum":
                whole.total_seconds += value
                replica.total_seconds += value
    return {**whole.summary(),
            "replicas": [{"replica": name or None, **series.summary()} for name, series in sorted(replicas.items())]}


async def read_gateways(db: Database) -> tuple[list[tuple[GatewayModel, list[Metric]]], list[str]]:
    """Every live gateway that says where it is scraped, read now: (gateway, its parsed exposition) for
    those that answered, and the ids of those that did not."""
    async with db.session() as session:
        gateways = list(await session.scalars(
            select(GatewayModel).where(GatewayModel.last_seen_at >= utcnow() - GATEWAY_LIVE,
                                       GatewayModel.metrics_url.is_not(None)).order_by(GatewayModel.id)))
    async with httpx.AsyncClient(timeout=READ_TIMEOUT) as client:
        answers = await asyncio.gather(*(client.get((g.metrics_url or "").rstrip("/") + LATENCY_PATH)
                                         for g in gateways), return_exceptions=True)
    read, unreachable = [], []
    for gateway, answer in zip(gateways, answers, strict=True):
        families = parse(answer.text) if isinstance(answer, httpx.Response) and answer.status_code == 200 else None
        if families is None:
            unreachable.append(gateway.id)
        else:
            read.append((gateway, families))
    return read, unreachable


async def service_traffic(db: Database, owner: str, name: str) -> dict[str, Any]:
    """``summarize`` over every live gateway that says where it is scraped, read now."""
    read, unreachable = await read_gateways(db)
    return {**summarize([families for _, families in read], f"{owner}/{name}"),
            "gateways": [gateway.id for gateway, _ in read], "unreachable_gateways": unreachable}


# ------------------------------------------------------------ the history's increases

# A series of the histogram: (service "owner/name", replica, status class).
SeriesKey = tuple[str, str, str]


@dataclass
class Counts:
    """One series' counts: requests, and cumulative bucket counts by upper bound as the ``le`` label
    writes it ("0.1", "+Inf")."""

    requests: float = 0.0
    buckets: dict[str, float] = field(default_factory=dict)


def series_of(families: Iterable[Metric]) -> dict[SeriesKey, Counts]:
    """Each series' counts in one gateway's exposition."""
    out: dict[SeriesKey, Counts] = {}
    for suffix, labels, value in _samples(families):
        if suffix not in ("bucket", "count"):
            continue
        counts = out.setdefault((labels.get("service", ""), labels.get("replica", ""), labels.get("code", "")),
                                Counts())
        if suffix == "count":
            counts.requests = value
        else:
            counts.buckets[labels["le"]] = value
    return out


def increase(before: Mapping[SeriesKey, Counts], now: Mapping[SeriesKey, Counts]) -> dict[SeriesKey, Counts]:
    """What each series of one gateway counted between two reads of it. A series new since ``before``
    counts all it holds; one that went down anywhere restarted from zero and counts what it holds now."""
    out: dict[SeriesKey, Counts] = {}
    for key, counts in now.items():
        prior = before.get(key)
        if prior is not None and not _restarted(prior, counts):
            counts = Counts(counts.requests - prior.requests,
                            {le: n - prior.buckets.get(le, 0.0) for le, n in counts.buckets.items()})
        if counts.requests > 0:
            out[key] = counts
    return out


def _restarted(before: Counts, now: Counts) -> bool:
    return now.requests < before.requests or any(n < before.buckets.get(le, 0.0) for le, n in now.buckets.items()) \
        or any(le not in now.buckets for le in before.buckets)


@dataclass
class Traffic:
    """A service's requests in one bucket: in all, of which 5xx, and the histogram's counts by bound."""

    requests: int = 0
    errors_5xx: int = 0
    buckets: dict[str, float] = field(default_factory=dict)

    def add(self, other: Traffic) -> None:
        self.requests += other.requests
        self.errors_5xx += other.errors_5xx
        self.buckets = add_histograms(self.buckets, other.buckets)


def per_service(increases: Iterable[Mapping[SeriesKey, Counts]]) -> dict[str, Traffic]:
    """Series' increases (of one or several gateways) summed per service (``owner/name``)."""
    out: dict[str, Traffic] = {}
    for series in increases:
        for (service, _, code), counts in series.items():
            n = round(counts.requests)
            out.setdefault(service, Traffic()).add(
                Traffic(n, n if code == "5xx" else 0, {le: round(v) for le, v in counts.buckets.items()}))
    return out


def add_histograms(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Two histograms' counts summed bound by bound."""
    out = dict(a)
    for le, n in b.items():
        out[le] = out.get(le, 0) + n
    return out


def parse(text: str) -> list[Metric] | None:
    """An exposition's metric families; None when it is not one."""
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        return None
