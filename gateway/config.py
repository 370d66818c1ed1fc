"""HAProxy's configuration as a pure function of the routing table: ``render`` (haproxy.cfg) and
``render_maps`` (the map files beside it).

Invariant: the same table and settings give the same bytes (services and replicas sorted, nothing
read from the clock or the machine), and nothing from the table reaches the files unless
``gateway.routes`` found it safe to write. Only ``server_args`` and the map keys are shared with the
runtime path (``gateway.plan``), so a server added through the runtime API is the server a reload
would have written.

Requests: the Host ``{service}.{owner}.{domain}`` routes first, path unchanged; else
``/s/{owner}/{service}[/...]`` routes by an exact key ``owner/service`` (so ``/s/a/bc`` never reaches
``b``) with the prefix stripped (``/s/a/b`` forwards ``/``) and sent on in ``X-Forwarded-Prefix``.
Each service is one backend: its rate limit (429), body limit (413), service key (401); with no usable
replica, a wake call to the hub (``wake.lua``: held while an idle service starts) and else a 503 at once;
then roundrobin over its replicas. Only what never reached a replica is
retried (``retry-on conn-failure``), on another replica.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gateway import latency
from gateway.routes import Replica, RouteService, RoutingTable

PATHS_MAP = "paths.map"
HOSTS_MAP = "hosts.map"
KEYS_MAP = "keys.map"
CONFIG = "haproxy.cfg"
# Holds a request to a service that has no usable replica while the hub wakes it (an idle service).
WAKE_LUA = Path(__file__).with_name("wake.lua")
# Seconds a client is told to wait when a service has no replica to serve it.
UNAVAILABLE_RETRY_AFTER = 2
# How long a chunked body may take to arrive before its size is judged on what came.
BODY_WAIT = "5s"

# Every replica's check and failure handling, in the config file and in the runtime API's `add server`
# alike (a dynamic server takes nothing from default-server). Ten failed connections in a row mark a
# replica down (under load, a dead one within milliseconds; a lone refusal of a busy one does not take a
# single replica out for a check's second); a check every 250 ms brings a down one back after one success.
SERVER_OPTIONS = ("check inter 1s fastinter 500ms downinter 250ms fall 2 rise 1 "
                  "observe layer4 error-limit 10 on-error mark-down")


@dataclass(frozen=True)
class RenderSettings:
    host: str
    port: int
    metrics_port: int
    state_dir: Path

    def path(self, name: str) -> str:
        return str(self.state_dir / name)

    @property
    def stats_socket(self) -> str:
        return self.path("haproxy.sock")


def _error(code: str, message: str) -> str:
    """An API error body, as the hub writes them, quoted for a `string` argument (single quotes: no escapes)."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":"))
    assert "'" not in body
    return f"'{body}'"


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_args(replica: Replica) -> str:
    """What follows a server's name on its `server` line and in `add server`."""
    return f"{replica.address} {SERVER_OPTIONS}"


def key_entry(service_id: str, sha256: str) -> str:
    """A service key's map key: the service, then the key's hash (a key opens only its own service)."""
    return f"{service_id}:{sha256.lower()}"


def render_maps(table: RoutingTable) -> dict[str, str]:
    """The map files' contents by file name: path keys and hosts to backends, key hashes to services."""
    services = table.usable_services()
    domain = table.usable_domain
    ids = {s.id for s in services}
    paths = sorted(f"{s.owner}/{s.name} {s.backend}\n" for s in services)
    hosts = sorted(f"{s.name}.{s.owner}.{domain}".lower() + f" {s.backend}\n" for s in services) if domain else []
    keys = sorted({f"{key_entry(k.service_id, k.sha256)} {k.service_id}\n" for k in table.service_keys
                   if k.service_id in ids})
    return {PATHS_MAP: "".join(paths), HOSTS_MAP: "".join(hosts), KEYS_MAP: "".join(keys)}


def render(table: RoutingTable | dict, settings: RenderSettings) -> str:
    """The whole haproxy.cfg for ``table`` (the hub's JSON or its model)."""
    if not isinstance(table, RoutingTable):
        table = RoutingTable.model_validate(table)
    parts = [_global(settings), _defaults(), _frontend(table, settings), _metrics(settings)]
    parts += [_backend(service, settings) for service in table.usable_services()]
    return "\n".join(parts)


def _global(settings: RenderSettings) -> str:
    return f"""# Written by mmanager gateway from the hub's routing table: edits are overwritten.
global
    # The listeners pass to each new worker on a reload through this socket: no connection is refused.
    stats socket {settings.stats_socket} mode 600 level admin expose-fd listeners
    stats timeout 30s
    {latency.LOAD}
    lua-load {WAKE_LUA}
    # An old worker serves its open connections this long after a reload at most.
    hard-stop-after 10m
"""


def _defaults() -> str:
    unavailable = _error("SERVICE_UNAVAILABLE", "the service has no replica able to answer; retry shortly")
    return f"""defaults
    mode http
    option forwardfor
    option dontlognull
    # On a reload the old worker answers the next request on each idle keep-alive connection with
    # `Connection: close` instead of closing it under the client.
    option idle-close-on-response
    timeout connect 1s
    timeout client 60s
    timeout server 300s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 10s
    timeout check 1s
    timeout tunnel 1h
    http-error status 503 content-type application/json hdr Retry-After {UNAVAILABLE_RETRY_AFTER} string {unavailable}
    http-error status 502 content-type application/json string {_error("BAD_GATEWAY", "the replica answered with invalid HTTP")}
    http-error status 504 content-type application/json string {_error("GATEWAY_TIMEOUT", "the replica did not answer in time")}
"""


def _frontend(table: RoutingTable, settings: RenderSettings) -> str:
    lines = [
        "frontend gateway",
        f"    bind {_bind(settings.host, settings.port)}",
        f"    {latency.START}",
    ]
    if table.usable_domain:
        lines.append(f"    http-request set-var(txn.backend) req.hdr(host),field(1,:),lower,map_str({settings.path(HOSTS_MAP)})")
    lines += [
        "    acl by_host var(txn.backend) -m found",
        "    acl s_path path_beg /s/",
        '    http-request set-var-fmt(txn.route) "%[path,field(3,/)]/%[path,field(4,/)]" if s_path !by_host',
        f"    http-request set-var(txn.backend) var(txn.route),map_str({settings.path(PATHS_MAP)}) if s_path !by_host",
        f"    http-request return status 404 content-type application/json string {_error('NOT_FOUND', 'no service at this address')} if !{{ var(txn.backend) -m found }}",
        "    acl by_path var(txn.route) -m found",
        '    http-request set-header X-Forwarded-Prefix "/s/%[var(txn.route)]" if by_path',
        "    http-request set-path %[path,regsub(^/s/[^/]+/[^/]+/?,/)] if by_path",
        *(f"    {rule}" for rule in latency.OBSERVE),
        "    use_backend %[var(txn.backend)]",
        "",
    ]
    return "\n".join(lines)


def _metrics(settings: RenderSettings) -> str:
    return f"""frontend metrics
    bind {_bind(settings.host, settings.metrics_port)}
    no log
    http-request use-service prometheus-exporter if {{ path /metrics }}
    {latency.SERVE}
    http-request return status 200 content-type text/plain string ok if {{ path /healthz }}
    http-request return status 404 content-type application/json string {_error("NOT_FOUND", "only /metrics and /healthz")}
"""


def _backend(service: RouteService, settings: RenderSettings) -> str:
    lines = [
        f"backend {service.backend}",
        f"    # {service.owner}/{service.name}",
        f"    {latency.service_rule(service.owner, service.name)}",
        "    balance roundrobin",
        "    retries 3",
        "    retry-on conn-failure",
        "    option redispatch 1",
    ]
    if service.health_path is not None:
        lines += [
            "    option httpchk",
            f"    http-check send meth GET uri {service.health_path} ver HTTP/1.1 hdr Host gateway",
            "    http-check expect status 200-299",
        ]
    limit = service.rate_limit_per_minute
    if limit:
        # A client over the limit is told to wait long enough for one request's share of the minute to pass.
        retry = max(1, math.ceil(60 / limit))
        lines += [
            "    stick-table type ipv6 size 100k expire 2m store http_req_rate(1m)",
            "    http-request track-sc1 src",
            f"    http-request return status 429 content-type application/json hdr Retry-After {retry} "
            f"string {_error('RATE_LIMITED', f'more than {limit} requests a minute from this address')} "
            f"if {{ sc_http_req_rate(1) gt {limit} }}",
        ]
    if service.max_body_bytes:
        most = service.max_body_bytes
        too_large = _error("PAYLOAD_TOO_LARGE", f"the request body is larger than {most} bytes")
        lines += [
            f"    http-request return status 413 content-type application/json string {too_large} "
            f"if {{ req.hdr_val(content-length) gt {most} }}",
            # A body without a length up front (chunked, or HTTP/2 frames): what arrives, up to a buffer's
            # worth, is measured. A request known to have no body passes the wait at once.
            f"    http-request wait-for-body time {BODY_WAIT} at-least {most + 1} if !{{ req.hdr(content-length) -m found }}",
            f"    http-request return status 413 content-type application/json string {too_large} "
            f"if !{{ req.hdr(content-length) -m found }} {{ req.body_size gt {most} }}",
        ]
    if service.private:
        lines += [
            f'    http-request set-var-fmt(txn.key) "{service.id}:%[http_auth_bearer,sha2(256),hex,lower]"',
            "    http-request return status 401 content-type application/json hdr WWW-Authenticate Bearer "
            f"string {_error('SERVICE_KEY_REQUIRED', 'this service needs a valid service key (Authorization: Bearer)')} "
            f"if !{{ var(txn.key),map_str({settings.path(KEYS_MAP)}) -m found }}",
            # The key opens the gateway only; the replica never sees it.
            "    http-request del-header Authorization",
        ]
    unavailable = _error("SERVICE_UNAVAILABLE", f"{service.owner}/{service.name} has no replica able to answer; "
                         "retry shortly")
    lines.append(f"    http-request lua.mm_wake {service.id} if {{ nbsrv eq 0 }} !{{ stopping }}")
    # Not in a worker that a reload is retiring: its backends count no server any more, yet it forwards
    # the last requests of its keep-alive connections (idle-close-on-response) to them.
    lines.append(f"    http-request return status 503 content-type application/json hdr Retry-After "
                 f"{UNAVAILABLE_RETRY_AFTER} string {unavailable} if {{ nbsrv eq 0 }} !{{ stopping }}")
    for replica in service.usable_replicas():
        disabled = " disabled" if replica.state == "drain" else ""
        lines.append(f"    server {replica.id} {server_args(replica)}{disabled}")
    lines.append("")
    return "\n".join(lines)
