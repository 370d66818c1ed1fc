"""The routing table as the hub serves it (``GET /api/gateway/routes``), read leniently.

Fields the gateway does not know are ignored; names that could not be written safely into HAProxy's
configuration or a map file (``safe_name``) make the service invalid, and ``usable_services`` leaves
it out, so nothing a user typed ever reaches the configuration unchecked.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# What may go into a map file's key, a backend's or a server's name: no spaces, quotes or separators.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A health check path written into the configuration: no spaces, quotes or '#'.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~/%?=&+-]*$")
# host:port, an IPv4 address or a DNS name; [v6]:port.
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")


def safe_name(value: str) -> bool:
    return bool(_SAFE.match(value))


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Replica(Lenient):
    id: str
    address: str
    # starting: not yet seen healthy by the hub; the gateway sends it nothing until its own check passes.
    state: Literal["ready", "drain", "starting"] = "ready"

    @property
    def valid(self) -> bool:
        if not (safe_name(self.id) and _ADDRESS.match(self.address)):
            return False
        return 0 < int(self.address.rsplit(":", 1)[1]) < 65536


class RouteService(Lenient):
    id: str
    owner: str
    name: str
    state: str = "running"
    private: bool = False
    rate_limit_per_minute: int = Field(default=0, ge=0)
    max_body_bytes: int = Field(default=0, ge=0)
    # None: the service declares no HTTP check; its replicas are checked by connecting to them.
    health_path: str | None = None
    replicas: tuple[Replica, ...] = ()

    @property
    def valid(self) -> bool:
        path_ok = self.health_path is None or bool(_SAFE_PATH.match(self.health_path))
        return all(map(safe_name, (self.id, self.owner, self.name))) and path_ok

    @property
    def backend(self) -> str:
        """The HAProxy backend's name (and the ``proxy`` label of its Prometheus series)."""
        return f"svc_{self.id}"

    def usable_replicas(self) -> list[Replica]:
        """Its valid replicas sorted by id (the first of a duplicated id wins)."""
        seen: dict[str, Replica] = {}
        for replica in self.replicas:
            if replica.valid:
                seen.setdefault(replica.id, replica)
        return [seen[key] for key in sorted(seen)]


class ServiceKey(Lenient):
    service_id: str
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class RoutingTable(Lenient):
    version: int = 0
    domain: str | None = None
    services: tuple[RouteService, ...] = ()
    service_keys: tuple[ServiceKey, ...] = ()

    def usable_services(self) -> list[RouteService]:
        """The valid services sorted by id; of two with one id or one route (owner/name), the first."""
        taken: set[object] = set()
        out = []
        for service in sorted((s for s in self.services if s.valid), key=lambda s: s.id):
            route = (service.owner, service.name)
            if route in taken or service.id in taken:
                continue
            taken.update((route, service.id))
            out.append(service)
        return out

    @property
    def usable_domain(self) -> str | None:
        domain = (self.domain or "").strip().lower().rstrip(".")
        return domain if domain and re.match(r"^[a-z0-9.-]+$", domain) else None
