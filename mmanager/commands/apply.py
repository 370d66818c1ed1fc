"""``mmanager apply -f FILE``: make the hub's services match a file of service specs (docs/CLI.md, apply).

A spec whose name the owner has no service by is created; one that exists is compared with the hub's
stored spec and PATCHed with what differs, and nothing is called when nothing differs. ``plan`` is pure:
it reads the stored spec and the file's, normalised the same way by the hub's own pydantic models
(``ServicePatch``, merged as the hub merges a PATCH, then ``ServiceSpec``), and says what would change.

Invariants: apply compares only the fields the file names (a field left out is left as the hub has it;
``field: null`` puts it back to its default, as in a PATCH). A spec made from a model type (``model:``) is
compared as the hub's create would store it: its ``env`` over the type's ``environment`` (``filled``), so a
second apply keeps the type's variables. Write-only fields (``registry_auth``, and any field the hub's
``ServiceSpec`` excludes from its output) cannot be read back, so they are never compared: they are sent
with a create and with any other change, and alone only when asked (``--send-write-only``). A file is read
as JSON values (``as_json``: keys are strings, a YAML date is refused). Every spec of the file is checked
before the first call: a file with one bad spec changes nothing.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from mmanager.commands import render
from mmanager.commands.render import escape
from mmanager.commands.session import USAGE, Json, Profile, connect, fail, note, progress_bar, stdout

if TYPE_CHECKING:
    from pydantic import ValidationError

    from hub.schemas import ModelTypeOut

# Fields a service is made with and that no PATCH changes: used to find (name) or to fill in (model) a service.
CREATE_ONLY = ("name", "model")
# Size strings compared by the bytes they mean ("2GB" == "2048MB"), by their paths in the spec.
SIZES = {("max_body_size",), ("resources", "memory_limit"), ("resources", "gpu_memory"),
         ("resources", "gpu_min_memory"), ("cpu_fallback", "resources", "memory_limit")}


class SpecError(Exception):
    """A file or spec refused before any call: ``code`` as the hub would answer it."""

    def __init__(self, code: str, message: str, status: int = 1) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any


@dataclass
class Plan:
    """What applying a spec to a stored service does: the changed fields (leaves, dotted), the PATCH body
    that makes them (top-level fields, normalised), and the write-only fields the file names."""

    changes: list[Change] = field(default_factory=list)
    patch: dict[str, Any] = field(default_factory=dict)
    write_only: list[str] = field(default_factory=list)


def write_only_fields() -> tuple[str, ...]:
    from hub.schemas import ServiceSpec

    return tuple(name for name, info in ServiceSpec.model_fields.items() if info.exclude)


def load(path: Path) -> list[dict[str, Any]]:
    """The specs of a YAML or JSON file (``-``: stdin): one mapping, a list of them, or YAML documents (``---``)."""
    import yaml

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise SpecError("INVALID_FILE", f"{path}: {exc.strerror or exc}", USAGE) from None
    try:
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
    except (ValueError, yaml.YAMLError) as exc:
        # The first line says where: the rest of a YAML error repeats the file's lines.
        raise SpecError("INVALID_FILE", f"{path}: not {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", USAGE) from None
    specs: list[dict[str, Any]] = []
    for doc in docs:
        for spec in doc if isinstance(doc, list) else [doc]:
            if spec is None:
                continue
            if not isinstance(spec, dict):
                raise SpecError("VALIDATION_ERROR", f"{path}: a service spec is a mapping, not {type(spec).__name__}")
            name = spec.get("name")
            specs.append(as_json(spec, f"{path}: " + (f"service {name!r}: " if isinstance(name, str) else "")))
    if not specs:
        raise SpecError("VALIDATION_ERROR", f"{path}: no service spec in the file")
    names = [s.get("name") for s in specs]
    twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if twice:
        raise SpecError("VALIDATION_ERROR", f"{path}: service {twice[0]!r} is named twice")
    return specs


# What YAML reads that JSON has no type for, by the name a person knows it by.
_NOT_JSON = {"date": "date", "datetime": "timestamp", "bytes": "binary value (!!binary)", "set": "set (!!set)"}


def as_json(value: Any, where: str, at: str = "") -> Any:
    """``value`` (a loaded document) as the JSON the hub is sent: every mapping key a string (a YAML
    ``5000:`` is ``"5000"``, ``true:`` is ``"true"``, as JSON would carry them), and every value a JSON one.
    A value JSON has none for (a YAML date or timestamp, ``!!binary``, ``!!set``, a NaN or an infinity) is
    refused (``INVALID_FILE``, naming the field): it is never turned into text the file did not spell."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = _key(key, where, at)
            if name in out:
                raise SpecError("INVALID_FILE", f"{where}{at or 'spec'}: key {name!r} is given twice", USAGE)
            out[name] = as_json(item, where, f"{at}.{name}" if at else name)
        return out
    if isinstance(value, list):
        return [as_json(item, where, f"{at}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise SpecError("INVALID_FILE", f"{where}{at}: {value} is not a JSON number", USAGE)
    kind = _NOT_JSON.get(type(value).__name__, type(value).__name__)
    raise SpecError("INVALID_FILE", f"{where}{at or 'spec'}: a YAML {kind} ({value}) is not JSON: quote it to give "
                    "a string", USAGE)


def _key(key: Any, where: str, at: str) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        if isinstance(key, float) and not math.isfinite(key):
            raise SpecError("INVALID_FILE", f"{where}{at or 'spec'}: key {key} is not a JSON number", USAGE)
        return json.dumps(key)
    kind = _NOT_JSON.get(type(key).__name__, type(key).__name__)
    raise SpecError("INVALID_FILE", f"{where}{at or 'spec'}: a key that is a YAML {kind} ({key}) is not JSON: "
                    "quote it", USAGE)


def problems(exc: ValidationError, prefix: str = "") -> str:
    """A validation error as the hub's one line: ``field.path: message; ...``."""
    return "; ".join(f"{prefix}{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())


def check(spec: dict[str, Any], source: str) -> None:
    """Refuse a spec the hub would refuse for its shape (422 ``VALIDATION_ERROR``), with the hub's own model."""
    from pydantic import ValidationError

    from hub.schemas import ServiceCreate

    try:
        ServiceCreate.model_validate(spec)
    except ValidationError as exc:
        name = spec.get("name")
        where = f"{source}: service {name!r}: " if isinstance(name, str) else f"{source}: "
        raise SpecError("VALIDATION_ERROR", where + problems(exc)) from None


def canonical(value: Any, path: tuple[str, ...] = ()) -> Any:
    """``value`` (a spec field at ``path``) as compared: sizes as bytes."""
    if isinstance(value, dict):
        return {k: canonical(v, (*path, k)) for k, v in value.items()}
    if path in SIZES and isinstance(value, str):
        from mmanager.wire import parse_memory

        try:
            return parse_memory(value)
        except ValueError:
            return value
    return value


def leaves(old: Any, new: Any, path: tuple[str, ...]) -> Iterator[Change]:
    """The differing leaves of two normalised values, mappings walked key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from leaves(old.get(key), new.get(key), (*path, key))
    elif canonical(old, path) != canonical(new, path):
        yield Change(".".join(path), old, new)


def needs_type(spec: dict[str, Any]) -> bool:
    """Whether comparing ``spec`` needs its model type (``filled``): it names one, and a field the hub's
    create fills from it otherwise than the file says (``env``, merged; ``image: null``, the type's)."""
    return spec.get("model") is not None and ("env" in spec or ("image" in spec and spec["image"] is None))


def filled(spec: dict[str, Any], model_type: ModelTypeOut) -> dict[str, Any]:
    """``spec`` as the hub's create from ``model_type`` makes it (``hub.services.catalog.model_spec``), for the
    fields it names: ``env`` over the type's ``environment``, and ``image: null`` the type's image. Every
    other field the type fills (resources, health_check, ports, probe, replicas, its ``spec``) is replaced
    whole by the file's at a create, as a PATCH replaces or merges it: compared as it is."""
    out = dict(spec)
    if isinstance(spec.get("env"), dict):
        out["env"] = {**model_type.environment, **spec["env"]}
    if "image" in spec and spec["image"] is None:
        out["image"] = model_type.image
    return out


def plan(stored: dict[str, Any], spec: dict[str, Any], model_type: ModelTypeOut | None = None) -> Plan:
    """What ``spec`` (a file's, checked) changes in a service whose stored spec is ``stored``; ``model_type``:
    the type ``spec`` names, when ``needs_type``."""
    from pydantic import ValidationError

    from hub.schemas import ServicePatch, ServiceSpec

    write_only = write_only_fields()
    if spec.get("model") is not None and spec["model"] != stored.get("model"):
        raise SpecError("VALIDATION_ERROR", f"service {spec['name']!r}: model: a service's model type is chosen "
                        f"when it is made ({stored.get('model')!r}); delete it to make it from another")
    if needs_type(spec):
        if model_type is None or model_type.name != spec["model"]:
            raise ValueError(f"plan of {spec['name']!r} needs its model type {spec['model']!r}")
        spec = filled(spec, model_type)
    given = {k: v for k, v in spec.items() if k not in CREATE_ONLY and k not in write_only}
    try:
        changes = ServicePatch.model_validate(given).model_dump(mode="json", exclude_unset=True)
        # Fields this client does not know (a newer hub's) are the hub's to keep: never compared, never sent.
        current = ServiceSpec.model_validate({k: v for k, v in stored.items() if k in ServiceSpec.model_fields}
                                             ).model_dump(mode="json")
        # As the hub merges a PATCH (hub.services.lifecycle.moves): null puts a field back to its default,
        # resources and health_check merge field by field, everything else is replaced whole.
        merged_changes = dict(changes)
        for key in ("resources", "health_check"):
            if isinstance(current.get(key), dict) and isinstance(changes.get(key), dict):
                merged_changes[key] = {**current[key], **changes[key]}
        merged = {k: v for k, v in {**current, **merged_changes}.items() if not (k in changes and v is None)}
        desired = ServiceSpec.model_validate(merged).model_dump(mode="json")
    except ValidationError as exc:
        raise SpecError("VALIDATION_ERROR", f"service {spec['name']!r}: " + problems(exc)) from None
    current, desired = _with_defaults(current), _with_defaults(desired)
    _keep_model_mounts(current, desired)
    result = Plan(write_only=[k for k in write_only if k in spec])
    for key in (k for k in spec if k in changes):  # in the file's order
        found = list(leaves(current.get(key), desired.get(key), (key,)))
        if found:
            result.changes.extend(found)
            result.patch[key] = copy.deepcopy(desired[key])
    return result


def _with_defaults(dump: dict[str, Any]) -> dict[str, Any]:
    """A spec's dump with the fields it leaves out when they hold their defaults (``prefetch``, ``models``,
    ``cpu_fallback``) put back, so that a change to or from a default reads as one (``true -> false``)."""
    from pydantic_core import to_jsonable_python

    from hub.schemas import ServiceSpec

    return {**{name: to_jsonable_python(info.get_default(call_default_factory=True))
               for name, info in ServiceSpec.model_fields.items() if not info.exclude and not info.is_required()},
            **dump}


def _keep_model_mounts(current: dict[str, Any], desired: dict[str, Any]) -> None:
    """A model file named without a mount is mounted where the hub put it (it fills the path in at create)."""
    placed = {m.get("digest"): m.get("mount") for m in current.get("models") or [] if isinstance(m, dict)}
    for model in desired.get("models") or []:
        if model.get("mount") is None and placed.get(model.get("digest")):
            model["mount"] = placed[model["digest"]]


def shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def apply_command(
    file: Annotated[Path, typer.Option("--file", "-f", help="service specs: YAML or JSON (- reads stdin); one, a "
                                       "list, or YAML documents separated by ---")],
    owner: Annotated[str | None, typer.Option(help="the services' owner (an admin's choice; default: you)")] = None,
    repo: Annotated[str, typer.Option(help="the repo a new service is made in")] = "default",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would change; change nothing")] = False,
    send_write_only: Annotated[bool, typer.Option(
        "--send-write-only", help="send the write-only fields (registry_auth) even when nothing else changed")] = False,
    json_out: Json = False,
    profile: Profile = None,
) -> None:
    """Create or update services to match FILE, printing what changed (a field's old -> new value)."""
    try:
        specs = load(file)
        for spec in specs:
            check(spec, str(file))
    except SpecError as exc:
        fail(exc.code, exc.message, exc.status)
    out = None if json_out else stdout()
    results: list[dict[str, Any]] = []
    with connect(profile) as client:
        me = client.me()
        if owner is not None and owner != me.username and not me.admin:
            # The hub would answer USER_NOT_FOUND to the create, and a dry run would call every spec new.
            fail("ADMIN_REQUIRED", f"--owner {owner}: only an admin applies another user's services "
                                   f"(you are {me.username}, not an admin)")
        who = owner or me.username
        # All planned before the first change: a spec the hub's merge would refuse changes nothing.
        plans: list[tuple[dict[str, Any], Any, Plan | None]] = []
        types: dict[str, ModelTypeOut] = {}
        for spec in specs:
            found = [s for s in client.services.list(name=spec["name"], owner=who) if s.name == spec["name"]]
            existing = found[0] if found else None
            try:
                kind = str(spec.get("model"))
                if existing is not None and needs_type(spec) and kind == existing.spec.get("model"):
                    types[kind] = types.get(kind) or _model_type(client, spec)
                plans.append((spec, existing, plan(existing.spec, spec, types.get(kind)) if existing else None))
            except SpecError as exc:
                fail(exc.code, exc.message, exc.status)
        failed = _run(client, out, plans, owner, repo, send_write_only, dry_run, results)
    if json_out:
        render.print_json({"dry_run": dry_run, "services": results})
    if failed is not None:
        fail(failed.code, failed.message)


def _model_type(client: Any, spec: dict[str, Any]) -> ModelTypeOut:
    from mmanager.client import ApiError

    try:
        found: ModelTypeOut = client.models.get(spec["model"])
    except ApiError as exc:
        if exc.code != "MODEL_NOT_FOUND":
            raise
        raise SpecError("MODEL_NOT_FOUND", f"service {spec['name']!r}: model type {spec['model']!r} is gone, so "
                        "which of its variables a create would add to env is unknown; leave model: out of the "
                        "file to apply env as it is") from None
    return found


def _run(client: Any, out: Console | None, plans: list[tuple[dict[str, Any], Any, Plan | None]], owner: str | None,
         repo: str, send_write_only: bool, dry_run: bool, results: list[dict[str, Any]]) -> Any:
    """Apply each plan in turn into ``results``, up to the first that fails: that one's ``ApiError`` (its
    result ``action: error``, the rest ``action: skipped``), or None when all were applied."""
    from mmanager.client import ApiError

    for index, (spec, existing, todo) in enumerate(plans):
        try:
            if existing is None or todo is None:
                results.append(_create(client, out, spec, owner, repo, dry_run))
            else:
                results.append(_update(client, out, spec, existing, todo, send_write_only, dry_run))
        except ApiError as exc:
            results.append({"name": spec["name"], "action": "error", "code": exc.code, "message": exc.message})
            results.extend({"name": rest["name"], "action": "skipped"} for rest, _, _ in plans[index + 1:])
            if out and index + 1 < len(plans):
                note("not applied (an earlier spec failed): "
                     + ", ".join(escape(rest["name"]) for rest, _, _ in plans[index + 1:]))
            return exc
    return None


def _create(client: Any, out: Console | None, spec: dict[str, Any], owner: str | None, repo: str,
            dry_run: bool) -> dict[str, Any]:
    name = spec["name"]
    if out:
        out.print(f"[bold]{escape(name)}[/bold]: new service" + (" (dry run)" if dry_run else ""))
    service = None
    if not dry_run:
        with progress_bar(out is None, f"create {name}") as bar:
            service = client.services.create(spec, owner=owner, repo=repo, progress=bar)
        if out:
            out.print(f"{escape(name)}: created, version {service.version}, {service.status}"
                      + (f", {escape(service.url)}" if service.url else ""))
    return {"name": name, "action": "create", "changes": [], "service": service}


def _update(client: Any, out: Console | None, spec: dict[str, Any], existing: Any, todo: Plan,
            send_write_only: bool, dry_run: bool) -> dict[str, Any]:
    name = spec["name"]
    send = bool(todo.write_only) and (bool(todo.patch) or send_write_only)
    if not todo.patch and not send:
        if out:
            out.print(f"[bold]{escape(name)}[/bold]: unchanged"
                      + (f" ({', '.join(todo.write_only)}: write-only, not compared)" if todo.write_only else ""))
        return {"name": name, "action": "unchanged", "changes": [], "service": existing}
    if out:
        out.print(f"[bold]{escape(name)}[/bold]: " + ("changes" if todo.changes else "write-only fields only")
                  + (" (dry run)" if dry_run else ""))
        for change in todo.changes:
            out.print(f"  {escape(change.field)}: {escape(shown(change.old))} -> {escape(shown(change.new))}")
        for key in todo.write_only if send else ():
            out.print(f"  {escape(key)}: (write-only) {'would be sent' if dry_run else 'sent'}")
    service = existing
    if not dry_run:
        patch = {**todo.patch, **({k: spec[k] for k in todo.write_only} if send else {})}
        with progress_bar(out is None, f"update {name}") as bar:
            service = client.services.update(existing.id, patch, progress=bar)
        if out:
            out.print(f"{escape(name)}: updated, version {service.version}, {service.status}")
    return {"name": name, "action": "update",
            "changes": [{"field": c.field, "old": c.old, "new": c.new} for c in todo.changes],
            "write_only_sent": todo.write_only if send and not dry_run else [], "service": service}
