"""gateway.config and gateway.plan: the routing table → haproxy.cfg and map files, and the runtime
commands that take a running HAProxy from one table to the next."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.config import CONFIG, HOSTS_MAP, KEYS_MAP, PATHS_MAP, RenderSettings, render, render_maps
from gateway.haproxy import check_config
from gateway.plan import is_success, runtime_plan
from gateway.routes import RoutingTable

SETTINGS = RenderSettings("0.0.0.0", 8080, 8081, Path("/var/lib/gw"))
HASH = "ab" * 32


def svc(sid: str = "s1", owner: str = "alice", name: str = "dnabert", replicas: tuple[dict[str, Any], ...] = (),
        **extra: Any) -> dict[str, Any]:
    return {"id": sid, "owner": owner, "name": name, "state": "running", "replicas": list(replicas), **extra}


def rep(rid: str, port: int = 32768, state: str = "ready") -> dict[str, Any]:
    return {"id": rid, "address": f"127.0.0.1:{port}", "state": state}


def table(*services: dict[str, Any], domain: str | None = "models.lab", keys: tuple[tuple[str, str], ...] = (),
          version: int = 1) -> RoutingTable:
    return RoutingTable.model_validate({
        "version": version, "domain": domain, "services": list(services),
        "service_keys": [{"service_id": s, "sha256": h} for s, h in keys]})


def backend(cfg: str, sid: str) -> str:
    return cfg.split(f"backend svc_{sid}\n")[1].split("\n\n")[0]


def test_same_table_same_bytes_whatever_the_order() -> None:
    one = table(svc("s1", replicas=(rep("r1"), rep("r2", 2))), svc("s2", name="b"), keys=(("s1", HASH),))
    other = table(svc("s2", name="b"), svc("s1", replicas=(rep("r2", 2), rep("r1"))), keys=(("s1", HASH),))
    assert render(one, SETTINGS) == render(other, SETTINGS)
    assert render_maps(one) == render_maps(other)
    assert render(one.model_dump(), SETTINGS) == render(one, SETTINGS)  # the hub's JSON as well


def test_routes_are_exact_keys_by_path_and_lowercased_by_host() -> None:
    maps = render_maps(table(svc("s1"), svc("s2", "Bob", "BERT")))
    assert maps[PATHS_MAP] == "Bob/BERT svc_s2\nalice/dnabert svc_s1\n"
    assert maps[HOSTS_MAP] == "bert.bob.models.lab svc_s2\ndnabert.alice.models.lab svc_s1\n"
    assert render_maps(table(svc("s1"), domain=None))[HOSTS_MAP] == ""


def test_the_frontend_strips_the_prefix_of_path_routes_only() -> None:
    cfg = render(table(svc()), SETTINGS)
    frontend = cfg.split("frontend gateway\n")[1].split("\n\n")[0]
    assert "bind 0.0.0.0:8080" in frontend
    assert '"%[path,field(3,/)]/%[path,field(4,/)]" if s_path !by_host' in frontend
    assert "set-path %[path,regsub(^/s/[^/]+/[^/]+/?,/)] if by_path" in frontend
    assert "map_str(/var/lib/gw/hosts.map)" in frontend
    assert '"NOT_FOUND"' in frontend
    assert "map_str(/var/lib/gw/hosts.map)" not in render(table(svc(), domain=None), SETTINGS)


def test_metrics_and_the_runtime_socket() -> None:
    cfg = render(table(), SETTINGS)
    assert "stats socket /var/lib/gw/haproxy.sock mode 600 level admin expose-fd listeners" in cfg
    assert "bind 0.0.0.0:8081\n" in cfg
    assert "use-service prometheus-exporter if { path /metrics }" in cfg
    assert "[::]:8080" in render(table(), RenderSettings("::", 8080, 8081, Path("/x")))


def test_a_backend_retries_only_what_never_reached_a_replica() -> None:
    cfg = backend(render(table(svc(replicas=(rep("r1"), rep("r2", 2, "drain")), health_path="/health")), SETTINGS),
                  "s1")
    assert "retry-on conn-failure\n" in cfg
    assert "option redispatch 1" in cfg
    assert "http-check send meth GET uri /health" in cfg
    assert "server r1 127.0.0.1:32768 check inter 1s" in cfg
    # No HTTP check declared: a replica is checked by connecting to it.
    assert "httpchk" not in backend(render(table(svc(health_path=None)), SETTINGS), "s1")
    # A draining replica gets no new request.
    assert cfg.splitlines()[-1].startswith("    server r2 127.0.0.1:2 check") and cfg.rstrip().endswith(" disabled")
    assert '"SERVICE_UNAVAILABLE"' in cfg and "hdr Retry-After 2" in cfg and "{ nbsrv eq 0 } !{ stopping }" in cfg
    # Before it, a request to a service with no replica asks the hub to wake it (gateway/wake.lua).
    assert cfg.index("http-request lua.mm_wake s1 if { nbsrv eq 0 } !{ stopping }") < cfg.index("status 503")


def test_limits_appear_only_when_set() -> None:
    plain = backend(render(table(svc()), SETTINGS), "s1")
    assert "stick-table" not in plain and "413" not in plain and "401" not in plain
    limited = backend(render(table(svc(rate_limit_per_minute=100, max_body_bytes=1000)), SETTINGS), "s1")
    assert "store http_req_rate(1m)" in limited
    assert "status 429 content-type application/json hdr Retry-After 1 " in limited
    assert "if { sc_http_req_rate(1) gt 100 }" in limited
    assert "if { req.hdr_val(content-length) gt 1000 }" in limited
    assert "at-least 1001 if !{ req.hdr(content-length) -m found }" in limited
    assert "{ req.body_size gt 1000 }" in limited
    assert "Retry-After 12 " in backend(render(table(svc(rate_limit_per_minute=5)), SETTINGS), "s1")


def test_a_private_service_checks_the_key_hash_against_its_own_keys() -> None:
    t = table(svc("s1", private=True), svc("s2", name="b"), keys=(("s1", HASH.upper()), ("s2", "cd" * 32),
                                                                   ("unknown", "ef" * 32)))
    cfg = backend(render(t, SETTINGS), "s1")
    assert '"s1:%[http_auth_bearer,sha2(256),hex,lower]"' in cfg
    assert "map_str(/var/lib/gw/keys.map) -m found }" in cfg
    assert "del-header Authorization" in cfg
    assert render_maps(t)[KEYS_MAP] == f"s1:{HASH} s1\ns2:{'cd' * 32} s2\n"


@pytest.mark.parametrize("bad", [
    svc(owner="al ice"), svc(name="a/b"), svc(sid="x'y"), svc(health_path="/h ealth"), svc(health_path="health"),
])
def test_what_cannot_be_written_safely_is_left_out(bad: dict[str, Any]) -> None:
    t = table(bad)
    assert render_maps(t)[PATHS_MAP] == ""
    assert "\nbackend " not in render(t, SETTINGS)


def test_bad_replicas_and_route_clashes_are_left_out() -> None:
    t = table(svc("s1", replicas=(rep("r 1"), {"id": "r2", "address": "host:99999"}, rep("r3"))),
              svc("s0", name="dnabert"))
    cfg = render(t, SETTINGS)
    assert "backend svc_s1" not in cfg  # s0 has the route first
    assert "server" not in backend(cfg, "s0")


def test_rendered_configurations_pass_haproxys_check(tmp_path: Path) -> None:
    assert shutil.which("haproxy"), "haproxy is not installed: make system-deps (scripts/ensure-system-deps.sh)"
    settings = RenderSettings("127.0.0.1", 8080, 8081, tmp_path)
    for t in (table(), table(domain=None), table(
            svc("s1", replicas=(rep("r1"), rep("r2", 2, "drain")), private=True, rate_limit_per_minute=100,
                max_body_bytes=10_000_000), svc("s2", "bob", "b"), keys=(("s1", HASH),))):
        files = {**render_maps(t), CONFIG: render(t, settings)}
        assert asyncio.run(check_config(files, tmp_path)) is None


# ---------------------------------------------------------------- gateway.plan


def test_replica_changes_go_through_the_runtime_api() -> None:
    old = table(svc(replicas=(rep("r1"), rep("r2", 2))), keys=(("s1", HASH),))
    new = table(svc(replicas=(rep("r1", 5), rep("r2", 2, "drain"), rep("r3", 3))), keys=(("s1", "cd" * 32),))
    plan = runtime_plan(old, new, SETTINGS)
    assert plan is not None
    assert plan.commands == [
        "set server svc_s1/r1 addr 127.0.0.1 port 5",
        "set server svc_s1/r2 state drain",
        "add server svc_s1/r3 127.0.0.1:3 check inter 1s fastinter 500ms downinter 250ms fall 2 rise 1 observe "
        "layer4 error-limit 10 on-error mark-down",
        "enable health svc_s1/r3",
        "set server svc_s1/r3 state ready",
        f"add map /var/lib/gw/keys.map s1:{'cd' * 32} s1",
        f"del map /var/lib/gw/keys.map s1:{HASH}",
    ]
    assert plan.deletions == []
    gone = runtime_plan(new, table(svc(replicas=(rep("r3", 3),)), keys=(("s1", "cd" * 32),)), SETTINGS)
    assert gone is not None
    assert gone.commands == ["set server svc_s1/r1 state maint", "set server svc_s1/r2 state maint"]
    assert gone.deletions == ["svc_s1/r1", "svc_s1/r2"]


def test_a_starting_replica_is_added_down_until_its_check_passes() -> None:
    plan = runtime_plan(table(svc(replicas=())), table(svc(replicas=(rep("r1", 1, "starting"),))), SETTINGS)
    assert plan is not None
    assert plan.commands[1:] == ["enable health svc_s1/r1", "set server svc_s1/r1 state ready",
                                 "set server svc_s1/r1 health down"]
    # Seen healthy by the hub later: nothing to do, its check brought it up already.
    later = runtime_plan(table(svc(replicas=(rep("r1", 1, "starting"),))), table(svc(replicas=(rep("r1", 1),))),
                         SETTINGS)
    assert later is not None and later.commands == []


def test_a_replica_back_before_its_deletion_went_through_is_revived_not_reloaded() -> None:
    plan = runtime_plan(table(svc(replicas=())), table(svc(replicas=(rep("r1", 7, "starting"),))), SETTINGS,
                        frozenset({"svc_s1/r1"}))
    assert plan is not None and plan.revived == ["svc_s1/r1"]
    assert plan.commands == ["set server svc_s1/r1 addr 127.0.0.1 port 7", "set server svc_s1/r1 state ready",
                             "set server svc_s1/r1 health down"]


@pytest.mark.parametrize("new", [
    table(svc(), svc("s2", name="b")),                          # a service added
    table(),                                                    # removed
    table(svc(rate_limit_per_minute=10)),                       # a limit changed
    table(svc(private=True)),
    table(svc(health_path="/ready")),
    table(svc(), domain="other.lab"),
])
def test_anything_else_reloads(new: RoutingTable) -> None:
    assert runtime_plan(table(svc()), new, SETTINGS) is None


def test_only_haproxys_success_answers_count() -> None:
    assert is_success("add server b/s 1.2.3.4:5", "New server registered.")
    assert not is_success("add server b/s 1.2.3.4:5", "Already exists a server with the same name in backend.")
    assert is_success("set server b/s state ready", "")
    assert not is_success("set server b/s state ready", "No such server.")
    assert is_success("set server b/s addr 1.2.3.4 port 5", "IP changed from '127.0.0.1' to '1.2.3.4'")
    assert is_success("del map /m k", "Key not found.")
