"""A service's gateway traffic, summarised from the gateways' latency histograms."""

from __future__ import annotations

import pytest

from hub.services.traffic import histogram_quantile, parse, summarize

H = "mmanager_gateway_request_duration_seconds"


def exposition(service: str, replica: str, code: str, buckets: dict[str, int], total: float) -> str:
    lines = [f"# TYPE {H} histogram"]
    labels = f'service="{service}",replica="{replica}",code="{code}"'
    for le, n in buckets.items():
        lines.append(f'{H}_bucket{{{labels},le="{le}"}} {n}')
    lines += [f"{H}_sum{{{labels}}} {total}", f"{H}_count{{{labels}}} {buckets['+Inf']}"]
    return "\n".join(lines) + "\n"


def test_quantiles_interpolate_inside_the_bucket_as_promql_does() -> None:
    buckets = {0.1: 50.0, 0.2: 90.0, 0.5: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.35)
    assert histogram_quantile(0.99, {0.1: 1.0, float("inf"): 100.0}) == 0.1
    assert histogram_quantile(0.5, {float("inf"): 0.0}) is None


def test_two_gateways_are_summed_per_service_and_per_replica() -> None:
    one = exposition("alice/dnabert", "r1", "2xx", {"0.1": 8, "0.5": 10, "+Inf": 10}, 1.0)
    one += exposition("alice/dnabert", "", "5xx", {"0.1": 2, "0.5": 2, "+Inf": 2}, 0.0).split("\n", 1)[1]
    one += exposition("bob/other", "r9", "2xx", {"0.1": 100, "0.5": 100, "+Inf": 100}, 1.0).split("\n", 1)[1]
    two = exposition("alice/dnabert", "r2", "2xx", {"0.1": 0, "0.5": 8, "+Inf": 8}, 2.0)
    traffic = summarize([parse(one) or [], parse(two) or []], "alice/dnabert")
    assert traffic["requests"] == 20 and traffic["responses"] == {"2xx": 18, "5xx": 2}
    assert traffic["errors_5xx"] == 2 and traffic["mean_seconds"] == pytest.approx(3.0 / 20)
    assert [(r["replica"], r["requests"]) for r in traffic["replicas"]] == [(None, 2), ("r1", 10), ("r2", 8)]
    assert traffic["latency_seconds"]["p50"] == pytest.approx(0.1)
    assert 0.1 < traffic["latency_seconds"]["p95"] <= 0.5


def test_what_is_not_an_exposition_does_not_parse() -> None:
    assert parse("<html>502 Bad Gateway</html>") is None
    assert parse("") == []


def test_a_service_without_traffic_has_no_quantiles() -> None:
    traffic = summarize([], "alice/none")
    assert traffic == {"requests": 0, "responses": {}, "errors_5xx": 0,
                       "latency_seconds": {"p50": None, "p95": None, "p99": None}, "mean_seconds": None,
                       "replicas": []}
