"""How the client commands show what the hub answered: the API's JSON as it is (``--json``), or rich tables
and key-value views for a person.

Invariant: every value from the hub is shown as text, never read as rich markup (a service may be named
``[bold]`` or ``<script>``), and without its control characters (C0, DEL, C1: an escape sequence in a hub
value never reaches the terminal; ``clean``); JSON carries them only as ``\\u`` escapes. A table row is one
line when stdout is not a terminal (``session.stdout``). Logs are the one thing printed raw (``services logs``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box, markup
from rich.console import Console
from rich.table import Table
from rich.text import Text

DASH = "-"
# The C0 controls, DEL and the C1 controls: removed from what is shown, a tab or a line break made a space
# (a table row stays one line).
_CONTROLS: dict[int, str | None] = {code: None for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS.update({ord(space): " " for space in "\t\n\r"})
# In JSON: the controls json.dumps leaves as they are (ensure_ascii=False escapes only C0), as \u escapes.
_JSON_CONTROLS = {code: f"\\u{code:04x}" for code in (0x7F, *range(0x80, 0xA0))}


def clean(value: str) -> str:
    """``value`` without control characters: what a terminal would read as a command (ESC, CSI, BEL, a
    carriage return that overwrites the line) is never printed from a hub value."""
    return value.translate(_CONTROLS)


def escape(value: str) -> str:
    """``value`` (a hub's or a user's) for a rich markup string: cleaned, and its markup escaped."""
    return markup.escape(clean(value))


def text(value: str, style: str = "") -> Text:
    return Text(clean(value), style=style)


def plain(value: Any) -> Any:
    """The API's JSON of ``value``: pydantic models dumped as the hub sends them, lists and dicts walked."""
    if hasattr(value, "model_dump"):  # a pydantic model; pydantic is not imported for mmanager's start
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def print_json(value: Any) -> None:
    # print, not rich: JSON must reach a pipe exactly, without markup or wrapping.
    print(json.dumps(plain(value), indent=2, ensure_ascii=False).translate(_JSON_CONTROLS))


def when(value: datetime | None, now: datetime | None = None) -> str:
    """``2026-12-07 11:03:06 (5m ago)``, in UTC; ``-`` for none."""
    if value is None:
        return DASH
    at = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return f"{at:%Y-%m-%d %H:%M:%S} ({age(at, now)} ago)"


def age(at: datetime, now: datetime | None = None) -> str:
    seconds = max(0, int(((now or datetime.now(UTC)) - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cell(value: Any) -> Text:
    if value is None or value == "":
        return Text(DASH)
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, datetime):
        return Text(when(value))
    if isinstance(value, dict | list):
        return text(json.dumps(value, ensure_ascii=False))
    return text(str(value))


def table(console: Console, columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    grid = Table(*columns, box=box.SIMPLE_HEAD, title=title, title_justify="left", show_edge=False, pad_edge=False)
    for row in rows:
        grid.add_row(*(v if isinstance(v, Text) else cell(v) for v in row))
    console.print(grid)


def fields(console: Console, pairs: Iterable[tuple[str, Any]]) -> None:
    """A key-value view of one object."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in pairs:
        grid.add_row(key, value if isinstance(value, Text) else cell(value))
    console.print(grid)


def styled(value: str, styles: dict[str, str]) -> Text:
    return text(value, styles.get(value, ""))


STATUS = {"running": "green", "healthy": "green", "succeeded": "green", "ok": "green",
          "pending": "yellow", "starting": "yellow", "draining": "yellow", "unknown": "yellow",
          "stopped": "dim", "failed": "red", "error": "red", "unhealthy": "red", "refused": "red"}


def status(value: str | None) -> Text:
    return styled(value or DASH, STATUS)


def endpoint(ep: Any) -> str:
    if ep is None:
        return DASH
    ports = ", ".join(f"{k}->{v}" if v else k for k, v in ep.ports.items())
    return f"{ep.host} {ports}".strip()


# Services


def services(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("NAME", "OWNER", "STATUS", "HEALTH", "REPLICAS", "VERSION", "URL", "ID"),
          ([s.name, s.owner, status(s.status), status(s.health), replica_count(s), s.version, s.url, s.id]
           for s in rows))


def replica_count(s: Any) -> str:
    """Copies running / copies asked for."""
    running = sum(1 for r in s.replicas if r.state == "running")
    return f"{running}/{s.spec.get('replicas', len(s.replicas))}"


def service(console: Console, s: Any) -> None:
    fields(console, [
        ("name", s.name), ("id", s.id), ("owner", f"{s.owner}/{s.repo}"),
        ("status", Text.assemble(status(s.status), text(f" ({s.status_message})" if s.status_message else ""))),
        ("desired", s.desired_state),
        ("health", Text.assemble(status(s.health), text(f" ({s.health_detail})" if s.health_detail else ""))),
        ("version", s.version), ("image", s.spec.get("image")), ("url", s.url),
        ("replicas", replica_count(s)), ("variant", s.variant), ("created", s.created_at), ("updated", s.updated_at),
    ])
    if s.replicas:
        table(console, ("REPLICA", "CONTROLLER", "STATE", "HEALTH", "ENDPOINT", "VARIANT"),
              ([r.id[:12], r.controller_id, status(r.state), status(r.health), endpoint(r.endpoint), r.variant]
               for r in s.replicas))


def history(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("VERSION", "CURRENT", "IMAGE", "REASON", "ACTOR", "CREATED"),
          ([d.version, "*" if d.current else "", d.image, d.reason, d.actor, d.created_at] for d in rows))


# Controllers


def controllers(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("ID", "TYPE", "STATUS", "ENABLED", "CONTAINERS", "LOAD", "MEMORY", "GPUS", "HEARTBEAT"),
          ([c.id, c.server_type, status(c.status), c.enabled, f"{c.containers_running}/{c.max_containers}",
            f"{c.load_percentage:.0f}%", f"{c.memory_usage_percent:.0f}%", len(c.gpus),
            age(c.last_heartbeat_at) + " ago" if c.last_heartbeat_at else DASH] for c in rows))


def controller(console: Console, c: Any) -> None:
    fields(console, [
        ("id", c.id), ("url", c.url), ("type", c.server_type), ("status", status(c.status)), ("enabled", c.enabled),
        ("priority", c.priority), ("weight", c.weight),
        ("containers", f"{c.containers_running}/{c.max_containers}"), ("load", f"{c.load_percentage:.1f}%"),
        ("memory", f"{c.memory_usage_percent:.1f}%"), ("heartbeat", c.last_heartbeat_at), ("error", c.error),
    ])
    if c.gpus:
        # The controller's GpuInfo as its health reports it (mmanager.wire): index, model, memory_mb, in_use.
        table(console, ("GPU", "MODEL", "MEMORY", "IN USE"),
              ([g.get("index"), g.get("model"), f"{g['memory_mb']} MB" if g.get("memory_mb") else None,
                g.get("in_use")] for g in c.gpus if isinstance(g, dict)))


# Operations, alerts, audit, models


def progress_text(op: Any) -> str:
    found = (op.details or {}).get("progress")
    if not isinstance(found, dict):
        return DASH
    from mmanager.commands.session import amount, counted

    total = counted(found.get("total")) or None
    return f"{amount(counted(found.get('done')), total, str(found.get('unit') or ''))}" \
           + (f" {found['step']}" if found.get("step") else "")


def operations(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("ID", "OPERATION", "STATUS", "SERVICE", "CONTROLLER", "ACTOR", "CREATED", "PROGRESS", "ERROR"),
          ([o.id, o.operation, status(o.status), o.service_id, o.controller_id, o.actor, o.created_at,
            progress_text(o), o.error] for o in rows))


def operation(console: Console, o: Any) -> None:
    took = (o.finished_at - o.created_at).total_seconds() if o.finished_at else None
    fields(console, [
        ("id", o.id), ("operation", o.operation), ("status", status(o.status)), ("error", o.error),
        ("service", o.service_id), ("controller", o.controller_id), ("container", o.container_id),
        ("actor", o.actor), ("created", o.created_at), ("finished", o.finished_at),
        ("took", f"{took:.1f}s" if took is not None else None), ("progress", progress_text(o)),
        ("details", o.details or None),
    ])


def alerts(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("KIND", "CONTROLLER", "CONTAINER", "SERVICE", "VALUE", "THRESHOLD", "STARTED", "RESOLVED"),
          ([a.kind, a.controller_id, a.container_name, a.service_id, f"{a.value:.1f}", f"{a.threshold:.1f}",
            a.started_at, a.resolved_at if a.resolved_at else styled("active", {"active": "red"})] for a in rows))


def audit(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("AT", "ACTOR", "SOURCE", "METHOD", "PATH", "STATUS", "RESULT", "CODE"),
          ([a.at, a.actor, a.source, a.method, a.path, a.status_code, status(a.result), a.error_code] for a in rows))


def models(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("NAME", "TASK", "IMAGE", "REPLICAS", "GPU", "DESCRIPTION"),
          ([m.name, m.task, m.image, m.replicas, bool(m.resources.get("gpu_required")), m.description]
           for m in rows))


def model(console: Console, m: Any) -> None:
    fields(console, [
        ("name", m.name), ("task", m.task), ("description", m.description), ("image", m.image),
        ("replicas", m.replicas), ("resources", m.resources), ("ports", m.ports), ("health_check", m.health_check),
        ("probe", "yes" if m.probe else None), ("environment", m.environment or None), ("spec", m.spec or None),
        ("updated", m.updated_at),
    ])


# Users and tokens


def _limit(value: int | None, used: int, show: Any = str) -> str:
    return f"{show(used)}/{show(value) if value is not None else 'no limit'}"


def users(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("USER", "ADMIN", "DISABLED", "SERVICES", "TOKENS", "REPLICAS", "GPUS", "MEMORY", "CREATED"),
          ([u.username, u.is_admin, u.disabled, u.services, u.active_tokens,
            _limit(u.limits.services, u.usage.services), _limit(u.limits.gpus, u.usage.gpus),
            _limit(u.limits.memory_bytes, u.usage.memory_bytes, size), u.created_at] for u in rows))


def user(console: Console, u: Any) -> None:
    def own(value: int | None, show: Any = str) -> str:
        return show(value) if value is not None else "hub default"

    fields(console, [
        ("user", u.username), ("admin", u.is_admin), ("disabled", u.disabled_at if u.disabled else False),
        ("created", u.created_at), ("services", u.services), ("active tokens", u.active_tokens),
        ("replicas", f"{_limit(u.limits.services, u.usage.services)} (quota: {own(u.quotas.services)})"),
        ("gpus", f"{_limit(u.limits.gpus, u.usage.gpus)} (quota: {own(u.quotas.gpus)})"),
        ("memory", f"{_limit(u.limits.memory_bytes, u.usage.memory_bytes, size)} "
                   f"(quota: {own(u.quotas.memory_bytes, size)})"),
    ])


def tokens(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "REVOKED"),
          ([t.id, t.name, t.prefix, t.created_at, t.last_used_at, t.revoked_at] for t in rows))


# Model files, service keys, images


def size(value: int) -> str:
    """Bytes as a person reads them (``12.3 MB``)."""
    from rich.filesize import decimal

    return decimal(value)


def model_files(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("DIGEST", "NAME", "SIZE", "UPLOADED BY", "CREATED"),
          ([f.digest, f.name, size(f.size), f.uploaded_by, f.created_at] for f in rows))


def service_keys(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("ID", "NAME", "PREFIX", "CREATED BY", "CREATED"),
          ([k.id, k.name, k.prefix, k.created_by, k.created_at] for k in rows))


def images(console: Console, rows: Sequence[Any]) -> None:
    """A controller's images as it lists them: dicts of ``repository``, ``tag``, ``id``, ``size``, ``created``."""
    table(console, ("REPOSITORY", "TAG", "ID", "SIZE", "CREATED"),
          ([i.get("repository"), i.get("tag"), i.get("id"),
            size(i["size"]) if isinstance(i.get("size"), int) else i.get("size"), i.get("created")]
           for i in rows if isinstance(i, dict)))


# Jobs, artifacts, pipelines

JOB_STATUS = {**STATUS, "cancelled": "dim", "timed_out": "red", "lost": "red"}
# How a rate's unit reads (``8,100 rec/s``); any other unit reads as it is.
_RATE_UNITS = {"records": "rec", "bytes": "B", "items": "items"}


def count(value: float) -> str:
    """``12,000``; a fraction kept only below ten (``2.5``)."""
    return f"{value:,.1f}" if value != int(value) and abs(value) < 10 else f"{value:,.0f}"


def job_progress(p: Any, rate: float | None = None) -> str:
    """A job's ``JobProgress`` as one line: ``12,000/52,000 records (8,100 rec/s)``; ``rate``: the one
    measured between two polls, for a job that reports none. ``-`` for none."""
    if p is None:
        return DASH
    shown = f"{count(p.done)}/{count(p.total)}" if p.total else count(p.done)
    line = f"{shown} {p.unit}".rstrip()
    speed = p.rate if p.rate is not None else rate
    if speed is not None:
        line += f" ({count(speed)} {_RATE_UNITS.get(p.unit, p.unit)}/s)"
    return line


def took(start: datetime | None, end: datetime | None) -> str | None:
    if start is None:
        return None
    seconds = ((end or datetime.now(UTC)) - start).total_seconds()
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def jobs(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("NAME", "OWNER", "STATUS", "ATTEMPTS", "PROGRESS", "CREATED", "TOOK", "ID"),
          ([j.name, j.owner, styled(j.status, JOB_STATUS), len(j.attempts) or DASH, job_progress(j.progress),
            j.created_at, took(j.started_at, j.finished_at), j.id] for j in rows))


def job(console: Console, j: Any) -> None:
    why = j.status_message or (f"exit code {j.exit_code}" if j.exit_code not in (None, 0) else "")
    fields(console, [
        ("name", j.name), ("id", j.id), ("owner", j.owner),
        ("status", Text.assemble(styled(j.status, JOB_STATUS), text(f" ({why})" if why else ""))),
        ("image", j.spec.get("image")), ("command", " ".join(map(str, [*j.spec.get("command", []),
                                                                       *j.spec.get("args", [])])) or None),
        ("progress", job_progress(j.progress)),
        ("message", j.progress.message if j.progress is not None else None),
        ("priority", j.priority), ("retries left", j.retries), ("timeout", f"{j.timeout:g}s" if j.timeout else None),
        ("exit code", j.exit_code), ("pipeline", f"{j.pipeline_id} step {j.step}" if j.pipeline_id else None),
        ("needs", ", ".join(j.needs) or None),
        ("created", j.created_at), ("started", j.started_at), ("finished", j.finished_at),
        ("took", took(j.started_at, j.finished_at)),
    ])
    if j.wait_reasons:
        table(console, ("CONTROLLER", "WHY NOT THERE"),
              ([r.get("controller_id"), r.get("reason")] for r in j.wait_reasons if isinstance(r, dict)),
              title="waiting for room:")
    if j.attempts:
        table(console, ("ATTEMPT", "CONTROLLER", "STATUS", "EXIT", "PROGRESS", "LOG", "STARTED", "TOOK", "ERROR"),
              ([a.number, a.controller_id, styled(a.status, JOB_STATUS), a.exit_code, job_progress(a.progress),
                size(a.log_size) if a.log_size else None, a.started_at, took(a.started_at, a.finished_at), a.error]
               for a in j.attempts))


def artifacts(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("PATH", "SIZE", "JOB", "ATTEMPT", "SHA256", "CREATED", "ID"),
          ([a.path, size(a.size), a.job_id, a.attempt, a.sha256.removeprefix("sha256:")[:12], a.created_at, a.id]
           for a in rows))


def pipelines(console: Console, rows: Sequence[Any]) -> None:
    table(console, ("NAME", "OWNER", "STATUS", "STEPS", "CREATED", "FINISHED", "ID"),
          ([p.name, p.owner, styled(p.status, JOB_STATUS), steps_done(p), p.created_at, p.finished_at, p.id]
           for p in rows))


def steps_done(p: Any) -> str:
    """Steps succeeded / steps in all."""
    total = len(p.spec.get("steps", [])) if isinstance(p.spec.get("steps"), list) else len(p.steps)
    return f"{sum(1 for s in p.steps if s.status == 'succeeded')}/{total or len(p.steps)}"


def pipeline_steps(p: Any, rates: dict[str, float] | None = None) -> Table:
    grid = Table("STEP", "STATUS", "ATTEMPTS", "PROGRESS", "TOOK", "WHY", "JOB", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False)
    for s in p.steps:
        why = s.status_message or (f"exit code {s.exit_code}" if s.exit_code not in (None, 0) else None)
        grid.add_row(cell(s.step or s.name), styled(s.status, JOB_STATUS), cell(len(s.attempts) or None),
                     cell(job_progress(s.progress, (rates or {}).get(s.id))), cell(took(s.started_at, s.finished_at)),
                     cell(why), cell(s.id))
    return grid


def pipeline(console: Console, p: Any) -> None:
    fields(console, [("name", p.name), ("id", p.id), ("owner", p.owner), ("status", styled(p.status, JOB_STATUS)),
                     ("steps", steps_done(p)), ("created", p.created_at), ("finished", p.finished_at)])
    if p.steps:
        console.print(pipeline_steps(p))
