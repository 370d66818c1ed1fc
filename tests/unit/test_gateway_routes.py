"""The routing table is a pure function of the services, their replicas and their keys."""

from __future__ import annotations

from typing import Any

from hub.services.gateway import routing_table as table_of
from hub.services.gateway import serving_port


def service(name: str, owner: str = "alice", **kw: Any) -> dict[str, Any]:
    """A service row, with (under ``copies``) its one running replica's registry row, unless told otherwise."""
    spec = {"name": name, "image": "x", "ports": {"5000": None},
            "health_check": {"path": "/health", "port": 5000}, **kw.pop("spec", {})}
    sid = f"id-{owner}-{name}"
    endpoint = kw.pop("endpoint", {"host": "10.1.0.7", "ports": {"5000": 32768}})
    copies = [{"service_id": sid, "container_id": f"ctr-{name}", "controller_id": "c1", "endpoint": endpoint,
               "health": kw.pop("health", "healthy")}] if endpoint else []
    return {"id": sid, "name": name, "owner": owner, "spec": spec, "status": "running",
            "desired_state": "running", "copies": kw.pop("copies", copies), **kw}


def routing_table(services: list[dict[str, Any]], keys: list[dict[str, Any]], domain: str | None) -> dict[str, Any]:
    return table_of(services, [copy for s in services for copy in s["copies"]], keys, domain)


def test_a_running_service_routes_to_its_published_port() -> None:
    table = routing_table([service("dnabert")], [], "models.lab")
    assert table["domain"] == "models.lab"
    [route] = table["services"]
    assert route == {"id": "id-alice-dnabert", "owner": "alice", "name": "dnabert", "state": "running",
                     "private": False, "rate_limit_per_minute": 100, "max_body_bytes": 10 * 1024**2,
                     "health_path": "/health",
                     "replicas": [{"id": "ctr-dnabert", "controller_id": "c1", "address": "10.1.0.7:32768",
                                   "state": "ready"}]}


def test_a_copy_not_seen_healthy_yet_is_starting() -> None:
    [route] = routing_table([service("new", health="unknown")], [], None)["services"]
    assert route["replicas"][0]["state"] == "starting"
    [unchecked] = routing_table([service("tcp", health="unknown", spec={"health_check": None})], [], None)["services"]
    assert unchecked["replicas"][0]["state"] == "ready"


def test_stopped_or_unpublished_services_keep_their_route_without_replicas() -> None:
    table = routing_table([service("a", desired_state="stopped"), service("b", endpoint=None),
                           service("c", spec={"ports": {}, "health_check": None})], [], None)
    assert [(r["name"], r["replicas"]) for r in table["services"]] == [("a", []), ("b", []), ("c", [])]


def test_the_port_is_the_health_checks_else_the_first_tcp_one() -> None:
    assert serving_port({"ports": {"53/udp": None, "8080/tcp": None}}) == "8080"
    assert serving_port({"ports": {"8080": None}, "health_check": {"port": 9000, "path": "/"}}) == "9000"
    assert serving_port({"ports": {"53/udp": None}}) is None
    [route] = routing_table([service("t", spec={"health_check": None})], [], None)["services"]
    assert route["health_path"] is None and route["replicas"][0]["address"] == "10.1.0.7:32768"


def test_the_gateway_settings_come_from_the_spec() -> None:
    [route] = routing_table([service("p", spec={"private": True, "rate_limit_per_minute": 0,
                                                "max_body_size": "1MB"})], [], None)["services"]
    assert (route["private"], route["rate_limit_per_minute"], route["max_body_bytes"]) == (True, 0, 1024**2)


def test_only_private_services_keys_are_listed() -> None:
    services = [service("open"), service("closed", spec={"private": True})]
    keys = [{"service_id": "id-alice-open", "key_hash": "a" * 64},
            {"service_id": "id-alice-closed", "key_hash": "c" * 64}]
    assert routing_table(services, keys, None)["service_keys"] == [{"service_id": "id-alice-closed",
                                                                    "sha256": "c" * 64}]


def test_the_same_rows_in_any_order_give_the_same_table() -> None:
    rows = [service("b", owner="bob"), service("a"), service("c", spec={"private": True})]
    keys = [{"service_id": "id-alice-c", "key_hash": h * 64} for h in "fe"]
    assert routing_table(rows, keys, None) == routing_table(rows[::-1], keys[::-1], None)
    assert [r["name"] for r in routing_table(rows, keys, None)["services"]] == ["a", "c", "b"]


def test_every_replica_is_a_server_of_its_route() -> None:
    copies = [{"service_id": "id-alice-big", "container_id": f"ctr-{i}", "controller_id": f"c{i}",
               "endpoint": {"host": f"10.1.0.{i}", "ports": {"5000": 30000 + i}},
               "health": "healthy" if i != 2 else "starting"} for i in (3, 1, 2)]
    [route] = routing_table([service("big", copies=copies)], [], None)["services"]
    assert [(r["id"], r["controller_id"], r["address"], r["state"]) for r in route["replicas"]] == [
        ("ctr-1", "c1", "10.1.0.1:30001", "ready"), ("ctr-2", "c2", "10.1.0.2:30002", "starting"),
        ("ctr-3", "c3", "10.1.0.3:30003", "ready")]
