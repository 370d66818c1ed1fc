"""The gateway's latency histograms (gateway/latency.lua) in a real HAProxy with two threads: every response
counted once in its (service, replica, status class) series, whichever thread served it, HAProxy's own
responses (401, 429, 503) included, those answered before the start rule not at all; a slow replica's
observations in the buckets above its delay; the sums no larger than what the clients measured; HAProxy's
own exporter served beside it; and a series left idle dropped."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import latency
from tests.support.haproxy import replica, running_haproxy
from tests.support.net import free_port
from tests.support.poll import wait_until

# Runs HAProxy: not part of `make unit`.
pytestmark = pytest.mark.slow

METRIC = latency.METRIC
SLOW = 0.05

CONFIG = """\
global
    nbthread 2
    {load}

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend gateway
    # One listener per thread, so that both threads serve requests.
    bind 127.0.0.1:{port0} thread 1
    bind 127.0.0.1:{port1} thread 2
    # Answered before the start rule: not observed.
    http-request return status 404 if {{ path /early }}
    {start}
    {observe0}
    {observe1}
    http-after-response set-header x-thread %[thread]
    # Made by the frontend, before any backend: the service is the frontend's name.
    http-request return status 401 if {{ path_beg /s/alice/private/ }}
    use_backend gone if {{ path_beg /s/alice/gone/ }}
    default_backend model

backend model
    {model_rule}
    http-request deny deny_status 429 if {{ path_end /limited }}
    balance roundrobin
    server fast 127.0.0.1:{fast}
    server slow 127.0.0.1:{slow}

backend gone
    {gone_rule}
    server lost 127.0.0.1:{closed} disabled

frontend metrics
    bind 127.0.0.1:{metrics}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    {serve}
"""


@dataclass
class Gateway:
    ports: tuple[int, int]
    metrics: int


@contextmanager
def running_gateway(workdir: Path, env: dict[str, str] | None = None) -> Iterator[Gateway]:
    with replica("fast") as fast, replica("slow", SLOW) as slow:
        gw = Gateway((free_port(), free_port()), free_port())
        config = CONFIG.format(load=latency.LOAD, start=latency.START, observe0=latency.OBSERVE[0],
                               observe1=latency.OBSERVE[1], serve=latency.SERVE,
                               model_rule=latency.service_rule("alice", "model"),
                               gone_rule=latency.service_rule("alice", "gone"), port0=gw.ports[0],
                               port1=gw.ports[1], fast=fast, slow=slow, closed=free_port(), metrics=gw.metrics)
        with running_haproxy(config, workdir, [*gw.ports, gw.metrics], env=env):
            yield gw


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(tmp_path) as gw:
        yield gw


def histogram(gw: Gateway) -> dict[str, dict[tuple[str, str, str], float]]:
    """The gateway's histogram series now: sample name -> (service, replica, code) -> value (buckets left
    out)."""
    text = httpx.get(f"http://127.0.0.1:{gw.metrics}{latency.PATH}", timeout=10).text
    series: dict[str, dict[tuple[str, str, str], float]] = collections.defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (METRIC + "_count", METRIC + "_sum"):
                series[sample.name][sample.labels["service"], sample.labels["replica"], sample.labels["code"]] = \
                    sample.value
    return series


def code_class(status: int) -> str:
    return f"{status // 100}xx"


def test_every_response_is_observed_once_per_service_replica_and_class(gateway: Gateway) -> None:
    paths = (["/s/alice/model/predict"] * 40 + ["/s/alice/model/fail"] * 10 + ["/s/alice/model/limited"] * 6
             + ["/s/alice/gone/predict"] * 6 + ["/s/alice/private/predict"] * 4 + ["/early"] * 2)

    def send(i: int) -> tuple[str, str, str, float, str]:
        port = gateway.ports[i % 2]
        started = time.perf_counter()
        # A connection per request, as many clients would open.
        answer = httpx.get(f"http://127.0.0.1:{port}{paths[i]}", timeout=10)
        took = time.perf_counter() - started
        service = next((name for part, name in (("/gone/", "alice/gone"), ("/private/", "gateway"),
                                                ("/early", "early")) if part in paths[i]), "alice/model")
        return service, answer.headers.get("x-replica", ""), code_class(answer.status_code), took, \
            answer.headers["x-thread"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(len(paths))))
    early = [a for a in answers if a[0] == "early"]
    assert [a[2] for a in early] == ["4xx", "4xx"]
    answers = [a for a in answers if a[0] != "early"]
    sent = collections.Counter(a[:3] for a in answers)
    measured: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    for service, replica_name, code, took, _ in answers:
        measured[service, replica_name, code] += took
    assert {a[4] for a in answers} == {"0", "1"}, "both threads served requests"
    assert sent["alice/model", "", "4xx"] == 6 and sent["alice/gone", "", "5xx"] == 6, sent
    assert sent["gateway", "", "4xx"] == 4, sent
    assert sent["alice/model", "fast", "2xx"] and sent["alice/model", "slow", "2xx"], sent

    # The observation is made before the response leaves HAProxy: nothing to wait for.
    text = httpx.get(f"http://127.0.0.1:{gateway.metrics}{latency.PATH}", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families[METRIC].type == "histogram"
    counts: dict[tuple[str, str, str], float] = {}
    sums: dict[tuple[str, str, str], float] = {}
    buckets: dict[tuple[str, str, str], dict[float, float]] = collections.defaultdict(dict)
    for sample in families[METRIC].samples:
        key = (sample.labels["service"], sample.labels["replica"], sample.labels["code"])
        if sample.name == METRIC + "_count":
            counts[key] = sample.value
        elif sample.name == METRIC + "_sum":
            sums[key] = sample.value
        elif sample.name == METRIC + "_bucket":
            buckets[key][float(sample.labels["le"])] = sample.value

    assert counts == dict(sent)
    for key, by_le in buckets.items():
        cumulative = [by_le[le] for le in sorted(by_le)]
        assert cumulative == sorted(cumulative) and cumulative[-1] == counts[key], key
        # HAProxy's clock runs inside the client's: no observation is longer than the client waited.
        assert 0 <= sums[key] <= measured[key], key
    for key in (("alice/model", "slow", "2xx"), ("alice/model", "slow", "5xx")):
        if key in sent:
            assert all(value == 0 for le, value in buckets[key].items() if le < SLOW), (key, buckets[key])
            assert sums[key] >= SLOW * counts[key], key
    # Made by HAProxy with no server up: counted as the service's 5xx, with no replica.
    assert counts["alice/gone", "", "5xx"] == 6

    promex = httpx.get(f"http://127.0.0.1:{gateway.metrics}/metrics", timeout=10)
    assert promex.status_code == 200
    assert 'haproxy_backend_http_responses_total{proxy="model",code="2xx"}' in promex.text


def test_a_series_left_idle_is_dropped_and_starts_again_from_zero(tmp_path: Path) -> None:
    with running_gateway(tmp_path, env={"MMANAGER_GATEWAY_SERIES_IDLE": "1"}) as gw:
        url = f"http://127.0.0.1:{gw.ports[0]}/s/alice/model/fail"
        for _ in range(3):
            assert httpx.get(url, timeout=10).status_code == 500
        assert sum(histogram(gw)[METRIC + "_count"].values()) == 3
        # Dropped by a scrape once unchanged for longer than a second.
        wait_until(lambda: not histogram(gw)[METRIC + "_count"], 10, "the idle series dropped", retry_on=())
        answer = httpx.get(url, timeout=10)
        assert histogram(gw)[METRIC + "_count"] == {("alice/model", answer.headers["x-replica"], "5xx"): 1}
