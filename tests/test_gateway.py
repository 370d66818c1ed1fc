"""The gateway end to end: ``mmanager gateway serve`` running a real HAProxy in front of real HTTP
replicas, following a fake hub's routing table that each test edits while a client keeps calling."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import FakeHub, Gateway, Load, Replica, service
from tests.support.net import free_port
from tests.support.poll import wait_until

pytestmark = pytest.mark.slow

SID = "9f2c0000000040008000000000000001"
ROUTE = "/s/alice/dnabert"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    hub = FakeHub("k" * 32).start()
    yield hub
    hub.stop()


@pytest.fixture
def replicas() -> Iterator[dict[str, Replica]]:
    started: dict[str, Replica] = {}

    class Replicas(dict[str, Replica]):
        def __missing__(self, name: str) -> Replica:
            started[name] = self[name] = Replica(name).start()
            return started[name]

    yield Replicas()
    for replica in started.values():
        replica.kill()


@pytest.fixture
def gateway(hub: FakeHub, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    gw = Gateway(hub, tmp_path / "state", tmp_path / "gateway.log").start()
    yield gw
    gw.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(gw.log.read_text()[-6000:])


def publish(hub: FakeHub, **changes: object) -> int:
    """Publish a table and wait until the gateway says it serves it (its registration); its version."""
    version = hub.set(**changes)
    wait_until(lambda: (hub.last_registration() or {}).get("version") == version, 10,
               f"the gateway to apply version {version}", interval=0.01)
    return version


def applies(gw: Gateway) -> list[str]:
    return [line.split(" applied by ")[1] for line in gw.log.read_text().splitlines() if " applied by " in line]


def test_routes_by_path_and_by_host_with_the_prefix_stripped(hub: FakeHub, gateway: Gateway,
                                                             replicas: dict[str, Replica]) -> None:
    version = publish(hub, domain="models.lab", services=[
        service(SID, "alice", "dnabert", [replicas["a"].entry()]),
        service("other", "alice", "dnabertx", [replicas["b"].entry()])])
    with httpx.Client(base_url=gateway.url) as client:
        answer = client.get(f"{ROUTE}/predict/batch?x=1").json()
        assert answer == {"server": "a", "path": "/predict/batch?x=1", "body": 0, "authorization": None,
                          "prefix": ROUTE}
        assert client.get(ROUTE).json()["path"] == "/"
        assert client.get(f"{ROUTE}/").json()["path"] == "/"
        assert client.get("/s/alice/dnabertx/p").json()["server"] == "b"
        for missing in ("/s/alice/dnaber", "/s/alice/dnabertxy/p", "/s/alice", "/", "/s/bob/dnabert"):
            answer = client.get(missing)
            assert answer.status_code == 404, missing
            assert answer.json()["error"]["code"] == "NOT_FOUND"
        by_host = client.get("/predict?x=1", headers={"Host": "DNABERT.alice.models.lab:8080"}).json()
        assert (by_host["server"], by_host["path"], by_host["prefix"]) == ("a", "/predict?x=1", None)
        assert client.get("/s/x/y", headers={"Host": "dnabertx.alice.models.lab"}).json()["path"] == "/s/x/y"
    # The agent registered itself with the version it serves, at the URL it was told to advertise.
    wait_until(lambda: (hub.last_registration() or {}).get("traffic", {}).get(SID) == 4, 10,
               "the four requests to alice/dnabert reported", interval=0.05)
    registration = hub.last_registration()
    assert registration == {"url": f"http://127.0.0.1:{gateway.port}", "version": version,
                            "metrics_url": f"http://127.0.0.1:{gateway.metrics_port}",
                            "traffic": {SID: 4, "other": 2}}
    assert hub.registrations[-1][0] == "/api/gateways/gw-test"
    metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics").text
    assert f'haproxy_backend_http_requests_total{{proxy="svc_{SID}"}}' in metrics
    assert httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/healthz").status_code == 200
    latency = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics/latency").text
    assert 'mmanager_gateway_request_duration_seconds_count{service="alice/dnabert",replica="a",code="2xx"}' in latency


def test_balances_over_replicas_and_a_drained_one_gets_no_new_request(
        hub: FakeHub, gateway: Gateway, replicas: dict[str, Replica]) -> None:
    publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry(), replicas["b"].entry()])])
    with httpx.Client(base_url=gateway.url) as client:
        served = [client.get(f"{ROUTE}/p").json()["server"] for _ in range(20)]
        assert served.count("a") == served.count("b") == 10
        publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry(),
                                                                  replicas["b"].entry("drain")])])
        assert {client.get(f"{ROUTE}/p").json()["server"] for _ in range(20)} == {"a"}
    assert applies(gateway)[-1].startswith("runtime API")


def test_a_killed_replica_costs_no_request_once_marked_down(hub: FakeHub, gateway: Gateway,
                                                            replicas: dict[str, Replica]) -> None:
    """kill -9 of one of two replicas under 200 requests a second: the requests it held when it died fail
    (they reached it: never retried), none after: a refused connection marks it down and is redispatched."""
    publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry(), replicas["b"].entry()])])
    load = Load(gateway.url + f"{ROUTE}/p").start()
    metrics = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    down = f'haproxy_server_status{{proxy="svc_{SID}",server="b",state="DOWN"}} 1'
    try:
        wait_until(lambda: load.servers["b"] >= 50, 10, "traffic on both replicas", interval=0.01)
        killed = time.monotonic()
        replicas["b"].kill()
        wait_until(lambda: down in httpx.get(metrics).text, 10, "b marked down", interval=0.01)
        marked = time.monotonic()
        after = load.mark()
        wait_until(lambda: after() >= 400, 15, "two seconds of requests after it", interval=0.05)
    finally:
        load.stop()
    at_kill = [t for t in load.failed_at if t < marked]
    print(f"\nkill -9 of 1 of 2 replicas: {len(at_kill)} failed before it was marked down "
          f"({(marked - killed) * 1000:.0f} ms after the kill), {load.failures - len(at_kill)} after; "
          f"{load.sent} requests; {load.errors}")
    assert load.failures == len(at_kill), load.errors
    assert len(at_kill) <= load.connections, load.errors
    assert load.servers["a"] > 400


def test_no_usable_replica_answers_503_at_once(hub: FakeHub, gateway: Gateway, replicas: dict[str, Replica]) -> None:
    dead = Replica("dead")  # listed, never started: nothing listens
    publish(hub, services=[service(SID, "alice", "dnabert", []),
                           service("s2", "alice", "gone", [dead.entry()])])
    with httpx.Client(base_url=gateway.url, timeout=5) as client:
        for path in (f"{ROUTE}/p", "/s/alice/gone/p", "/s/alice/gone/p"):
            started = time.monotonic()
            answer = client.post(path, json={"x": 1})
            assert time.monotonic() - started < 1.0, path
            assert answer.status_code == 503, path
            assert answer.headers["Retry-After"] == "2"
            assert answer.json()["error"]["code"] == "SERVICE_UNAVAILABLE"


def test_rate_limit_answers_429_with_retry_after(hub: FakeHub, gateway: Gateway,
                                                 replicas: dict[str, Replica]) -> None:
    publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry()], rate_limit_per_minute=5),
                           service("s2", "alice", "free", [replicas["a"].entry()])])
    with httpx.Client(base_url=gateway.url) as client:
        assert [client.get(f"{ROUTE}/p").status_code for _ in range(5)] == [200] * 5
        limited = client.get(f"{ROUTE}/p")
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "12"
        assert limited.json()["error"]["code"] == "RATE_LIMITED"
        # Per service: another one is not limited.
        assert [client.get("/s/alice/free/p").status_code for _ in range(10)] == [200] * 10


def test_body_limit_answers_413_for_sized_and_chunked_bodies(hub: FakeHub, gateway: Gateway,
                                                             replicas: dict[str, Replica]) -> None:
    publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry()], max_body_bytes=1000)])

    def chunks(size: int) -> Iterator[bytes]:
        yield b"x" * (size // 2)
        yield b"x" * (size - size // 2)

    with httpx.Client(base_url=gateway.url) as client:
        assert client.post(f"{ROUTE}/p", content=b"x" * 1000).json()["body"] == 1000
        assert client.post(f"{ROUTE}/p", content=chunks(1000)).json()["body"] == 1000
        for body in (b"x" * 1001, chunks(1001), chunks(50_000)):
            answer = client.post(f"{ROUTE}/p", content=body)
            assert answer.status_code == 413
            assert answer.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


def test_a_private_service_needs_one_of_its_keys(hub: FakeHub, gateway: Gateway,
                                                 replicas: dict[str, Replica]) -> None:
    key, other = "sk-" + "1" * 40, "sk-" + "2" * 40

    def digest(k: str) -> str:
        return hashlib.sha256(k.encode()).hexdigest()

    services = [service(SID, "alice", "dnabert", [replicas["a"].entry()], private=True),
                service("s2", "alice", "open", [replicas["a"].entry()])]
    publish(hub, services=services, service_keys=[{"service_id": SID, "sha256": digest(key)},
                                                  {"service_id": "s2", "sha256": digest(other)}])
    assert key not in (gateway.state_dir / "keys.map").read_text()
    with httpx.Client(base_url=gateway.url) as client:
        for headers in ({}, {"Authorization": f"Bearer {other}"}, {"Authorization": "Bearer"},
                        {"Authorization": f"Basic {key}"}):
            answer = client.get(f"{ROUTE}/p", headers=headers)
            assert answer.status_code == 401, headers
            assert answer.json()["error"]["code"] == "SERVICE_KEY_REQUIRED"
        answer = client.get(f"{ROUTE}/p", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        assert answer.json()["authorization"] is None  # the key stays at the gateway
        # Revoked: the key map changes through the runtime API, no reload.
        publish(hub, service_keys=[{"service_id": "s2", "sha256": digest(other)}])
        assert client.get(f"{ROUTE}/p", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert applies(gateway)[-1].startswith("runtime API")


def test_applies_are_hitless_under_load(hub: FakeHub, gateway: Gateway, replicas: dict[str, Replica]) -> None:
    a, b, c = replicas["a"], replicas["b"], replicas["c"]
    publish(hub, services=[service(SID, "alice", "dnabert", [a.entry(), b.entry()])])
    load = Load(gateway.url + f"{ROUTE}/p").start()
    live: dict[str, float] = {}

    def step(what: str, expect: str | None, **changes: object) -> None:
        """Publish, then time until the change shows: ``expect`` (a replica) answers, or the version is served."""
        after = load.mark()
        started = time.monotonic()
        publish(hub, **changes)
        if expect:
            wait_until(lambda: load.servers[expect] > 0, 10, f"{expect} serving", interval=0.005)
        live[what] = time.monotonic() - started
        wait_until(lambda: after() >= 200, 10, "a second of requests after the change", interval=0.05)

    try:
        wait_until(lambda: load.sent >= 200, 10, "the load running", interval=0.05)
        step("replica added", "c", services=[service(SID, "alice", "dnabert", [a.entry(), b.entry(), c.entry()])])
        step("replica drained", None,
             services=[service(SID, "alice", "dnabert", [a.entry(), b.entry("drain"), c.entry()])])
        b_served = load.servers["b"]
        step("replica removed", None, services=[service(SID, "alice", "dnabert", [a.entry(), c.entry()])])
        assert load.servers["b"] == b_served
        # Taken out of the running worker: deleted once its last connection went.
        wait_until(lambda: f"server svc_{SID}/b deleted" in gateway.log.read_text(), 10, "b deleted", interval=0.05)
        step("service added (reload)", None, services=[service(SID, "alice", "dnabert", [a.entry(), c.entry()]),
                                                         service("s2", "bob", "new", [b.entry()])])
        step("limits changed (reload)", None,
             services=[service(SID, "alice", "dnabert", [a.entry(), c.entry()], max_body_bytes=10_000_000),
                       service("s2", "bob", "new", [b.entry()])])
        step("replica re-added", "b",
             services=[service(SID, "alice", "dnabert", [a.entry(), b.entry(), c.entry()],
                               max_body_bytes=10_000_000), service("s2", "bob", "new", [b.entry()])])
        after = load.mark()
        for limit in range(1000, 1010):  # ten reloads back to back
            publish(hub, services=[service(SID, "alice", "dnabert", [a.entry(), b.entry(), c.entry()],
                                           max_body_bytes=limit), service("s2", "bob", "new", [b.entry()])])
        wait_until(lambda: after() >= 400, 20, "requests through the reloads", interval=0.05)
    finally:
        load.stop()
    kinds = applies(gateway)
    print(f"\nrequests {load.sent}, failures {load.failures}, outcomes {dict(load.outcomes)}")
    print("apply to live (s):", {k: round(v, 3) for k, v in live.items()})
    print("applies:", kinds)
    assert load.failures == 0, load.errors[:5]
    assert [k.split(" ")[0] for k in kinds[-16:]] == ["runtime", "runtime", "runtime", "reload", "reload", "runtime",
                                                      *["reload"] * 10]


def test_without_the_hub_it_serves_the_last_table_applied(hub: FakeHub, gateway: Gateway,
                                                          replicas: dict[str, Replica]) -> None:
    publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry()])])
    hub.stop()
    gateway.stop()
    gateway.start()
    assert httpx.get(gateway.url + f"{ROUTE}/p").json()["server"] == "a"


def test_haproxy_goes_with_an_agent_killed_outright(hub: FakeHub, gateway: Gateway) -> None:
    assert gateway.proc is not None
    gateway.proc.kill()  # the agent alone, not its session: HAProxy must not outlive it
    gateway.proc.wait(5)

    def port_free() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", gateway.port)) != 0

    wait_until(port_free, 10, "HAProxy gone with its agent", interval=0.05, retry_on=())


@pytest.mark.parametrize("how", ["runtime API", "reload"])
def test_a_removed_replica_finishes_its_requests_before_the_version_is_reported(
        hub: FakeHub, gateway: Gateway, replicas: dict[str, Replica], how: str) -> None:
    """The hub retires a replica once the gateways report a table without it: by then no request of
    its may be left in HAProxy, whether the table was applied at runtime or by a reload."""
    a, b = replicas["a"], replicas["b"]
    before = publish(hub, services=[service(SID, "alice", "dnabert", [b.entry()])])
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.get, gateway.url + f"{ROUTE}/slow", timeout=10)
        wait_until(lambda: _in_flight(gateway) > 0, 5, "the slow request at b", interval=0.01)
        extra = [service("s2", "bob", "new", [a.entry()])] if how == "reload" else []
        version = hub.set(services=[service(SID, "alice", "dnabert", [a.entry()]), *extra])
        wait_until(lambda: applies(gateway)[-1].startswith(how) and f"version {version} applied" in
                   gateway.log.read_text(), 5, "the new table applied", interval=0.01)
        assert (hub.last_registration() or {}).get("version") == before
        answer = slow.result()
    assert answer.status_code == 200 and answer.json()["server"] == "b"
    wait_until(lambda: (hub.last_registration() or {}).get("version") == version, 10, "the new version reported",
               interval=0.01)
    assert httpx.get(gateway.url + f"{ROUTE}/p").json()["server"] == "a"


def _in_flight(gateway: Gateway) -> int:
    """Requests HAProxy's gateway frontend holds now."""
    text = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics").text
    for line in text.splitlines():
        if line.startswith('haproxy_frontend_current_sessions{proxy="gateway"}'):
            return int(float(line.split()[-1]))
    return 0


def test_a_request_to_an_idle_service_wakes_it_and_is_answered_once_it_serves(
        hub: FakeHub, gateway: Gateway, replicas: dict[str, Replica]) -> None:
    hub.idle.add(SID)
    publish(hub, services=[service(SID, "alice", "dnabert", [], state="idle")])
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        held = pool.submit(httpx.post, gateway.url + f"{ROUTE}/predict", json={"x": 1}, timeout=30)
        wait_until(lambda: SID in hub.wakes, 5, "the hub asked to wake the service", interval=0.01)
        assert not held.done()
        # The hub starts a replica and publishes it (the agent adds it at runtime): the request goes on.
        hub.idle.discard(SID)
        publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry()])])
        answer = held.result()
    print(f"\nheld {time.monotonic() - started:.3f} s while the service woke")
    assert answer.status_code == 200 and answer.json()["server"] == "a"
    assert applies(gateway)[-1].startswith("runtime API")


def test_the_next_hub_replica_answers_when_the_first_does_not(hub: FakeHub, tmp_path: Path,
                                                              replicas: dict[str, Replica]) -> None:
    gw = Gateway(hub, tmp_path / "state", tmp_path / "gateway.log",
                 hub_url=f"http://127.0.0.1:{free_port()},{hub.url}").start()
    try:
        publish(hub, services=[service(SID, "alice", "dnabert", [replicas["a"].entry()])])
        assert httpx.get(gw.url + f"{ROUTE}/p").json()["server"] == "a"
    finally:
        gw.stop()
