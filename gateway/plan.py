"""How to get from the routing table HAProxy serves to a new one: runtime API commands, or a reload.

Pure: ``runtime_plan(old, new, settings)`` reads two tables and returns the commands, or None when
only a reload can do it. Invariant: the runtime path is taken only when the configuration without its
servers and service keys (the *skeleton*) and the route maps render to the same bytes for both tables, so after the
commands the worker serves what a reload of the new files would serve: the same servers (the same
``server_args``), the same key map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import HOSTS_MAP, KEYS_MAP, PATHS_MAP, RenderSettings, render, render_maps, server_args
from gateway.routes import Replica, RoutingTable


@dataclass
class RuntimePlan:
    # Each must succeed; any other answer sends the agent to a reload.
    commands: list[str] = field(default_factory=list)
    # `backend/server` to delete once they have no connection left (they are in maintenance by then).
    deletions: list[str] = field(default_factory=list)
    # Servers taken out earlier, not deleted yet, that serve again (a woken service's same container).
    revived: list[str] = field(default_factory=list)


def skeleton(table: RoutingTable) -> RoutingTable:
    """``table`` without replicas or service keys: what only a reload can change."""
    services = tuple(s.model_copy(update={"replicas": ()}) for s in table.services)
    return table.model_copy(update={"services": services, "service_keys": (), "version": 0})


def _fixed(table: RoutingTable, settings: RenderSettings) -> tuple[str, str, str]:
    """What the runtime path never changes: the skeleton's configuration and the route maps."""
    bare = skeleton(table)
    maps = render_maps(bare)
    return render(bare, settings), maps[PATHS_MAP], maps[HOSTS_MAP]


def _split(address: str) -> tuple[str, str]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), port


def runtime_plan(old: RoutingTable, new: RoutingTable, settings: RenderSettings,
                 pending: frozenset[str] = frozenset()) -> RuntimePlan | None:
    """The runtime commands that take a worker serving ``old`` to ``new``; None: reload. ``pending``:
    servers removed earlier whose deletion has not gone through yet (one coming back needs a reload)."""
    if _fixed(old, settings) != _fixed(new, settings):
        return None
    plan = RuntimePlan()
    before = {s.backend: {r.id: r for r in s.usable_replicas()} for s in old.usable_services()}
    for service in new.usable_services():
        had = before.get(service.backend, {})
        now = {r.id: r for r in service.usable_replicas()}
        for rid, replica in now.items():
            name = f"{service.backend}/{rid}"
            if rid not in had and name in pending:
                # Still there, in maintenance: put back where it now answers, instead of added again.
                host, port = _split(replica.address)
                plan.commands.append(f"set server {name} addr {host} port {port}")
                plan.revived.append(name)
            elif rid not in had:
                plan.commands += _add(name, replica)
            elif had[rid].address != replica.address:
                host, port = _split(replica.address)
                plan.commands.append(f"set server {name} addr {host} port {port}")
            admin = "drain" if replica.state == "drain" else "ready"
            if rid not in had or _admin(had[rid]) != admin:
                plan.commands.append(f"set server {name} state {admin}")
            if rid not in had and replica.state == "starting":
                # Down (once out of maintenance, which would undo it) until its first check passes: a
                # container just started may not listen yet.
                plan.commands.append(f"set server {name} health down")
        for rid in sorted(set(had) - set(now)):
            name = f"{service.backend}/{rid}"
            plan.commands.append(f"set server {name} state maint")
            plan.deletions.append(name)
    keys = settings.path(KEYS_MAP)
    old_keys = _key_lines(old)
    new_keys = _key_lines(new)
    plan.commands += [f"add map {keys} {line}" for line in sorted(new_keys - old_keys)]
    plan.commands += [f"del map {keys} {line.split()[0]}" for line in sorted(old_keys - new_keys)]
    return plan


def _admin(replica: Replica) -> str:
    return "drain" if replica.state == "drain" else "ready"


def _add(name: str, replica: Replica) -> list[str]:
    # A dynamic server starts in maintenance with its check off; the state command that follows readies it.
    return [f"add server {name} {server_args(replica)}", f"enable health {name}"]


def _key_lines(table: RoutingTable) -> set[str]:
    return set(render_maps(table)[KEYS_MAP].splitlines())


def is_success(command: str, answer: str) -> bool:
    """Whether HAProxy's answer to a runtime ``command`` says it was done."""
    if command.startswith("add server"):
        return answer.startswith("New server registered")
    if command.startswith("del server"):
        return answer.startswith("Server deleted")
    if " addr " in command:
        return answer.startswith(("IP changed", "no need to change", "port changed"))
    if command.startswith("del map"):
        return answer in ("", "Key not found.")
    return answer == ""

