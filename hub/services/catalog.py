"""The model catalog: the model types an admin registered, and how a type fills in a create's spec.

Invariant: every stored type makes a valid ServiceSpec that the spec policy of the hub (or of the CLI's
environment) allowed when it was written, so a create from a type fails only for what the create itself
adds. A type is copied into each service made from it (``spec.model`` names it), never referenced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hub.db import Database
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.models import ModelTypeModel, utcnow
from hub.schemas import ModelTypeIn, ModelTypeOut, ServiceSpec
from hub.services.policy import check_policy
from mmanager.errors import problems
from mmanager.policy import SpecPolicy

# The spec fields a type keeps in columns or at the top of its shape; ``spec`` holds only the others.
OWN_FIELDS = frozenset({"name", "model", "image", "resources", "replicas", "probe", "ports", "health_check", "env"})


def _not_found(name: str) -> NotFound:
    return NotFound(f"model type {name!r} not found (GET /api/models lists them)", code="MODEL_NOT_FOUND")


def checked(body: ModelTypeIn, policy: SpecPolicy) -> dict[str, Any]:
    """The type's ``spec`` column: what ``body`` fills in beyond its columns, under ServiceSpec's names,
    after the whole type was validated as the spec of a service named like it, and allowed by ``policy``.
    ``InvalidRequest`` (422 ``INVALID_MODEL_TYPE``, or ``PROBE_NEEDS_HEALTH_CHECK``) or ``SpecForbidden`` (403)
    otherwise."""
    taken = sorted(OWN_FIELDS & body.spec.keys())
    if taken:
        raise InvalidRequest(f"spec may not hold {', '.join(taken)}: give them at the top of the model type",
                             {"fields": taken}, code="INVALID_MODEL_TYPE")
    written = sorted({"registry_auth", "secrets"} & body.spec.keys())
    if written:
        # A type is stored and shown in clear: credentials and secrets belong to each service made from it.
        raise InvalidRequest(f"spec may not hold {', '.join(written)}: give it with each create of the model type",
                             {"fields": written}, code="INVALID_MODEL_TYPE")
    fields: dict[str, Any] = {
        **body.spec, "name": body.name, "image": body.image, "resources": body.resources.model_dump(),
        "replicas": body.replicas, "ports": body.ports, "env": body.environment,
        "health_check": body.health_check.model_dump() if body.health_check else None,
        "probe": body.probe.model_dump() if body.probe else None,
    }
    try:
        spec = ServiceSpec.model_validate(fields)
    except ValidationError as exc:
        found = problems(RequestValidationError(exc.errors(include_url=False)))
        raise InvalidRequest("this model type does not make a valid service spec: " + "; ".join(
            f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in found), found, code="INVALID_MODEL_TYPE") from None
    check_policy(policy, spec)
    return spec.model_dump(mode="json", include={"ports", "health_check", "env", *body.spec})


def _write(row: ModelTypeModel, body: ModelTypeIn, spec: dict[str, Any]) -> None:
    row.task, row.description, row.image = body.task, body.description, body.image
    row.resources = body.resources.model_dump(mode="json")
    row.replicas, row.spec = body.replicas, spec
    row.probe = body.probe.model_dump(mode="json") if body.probe else None


def types_query() -> Select[ModelTypeModel]:
    return select(ModelTypeModel).order_by(ModelTypeModel.name)


async def get_type(session: AsyncSession, name: str) -> ModelTypeModel:
    row = await session.get(ModelTypeModel, name)
    if row is None:
        raise _not_found(name)
    return row


async def create_type(session: AsyncSession, body: ModelTypeIn, policy: SpecPolicy) -> ModelTypeModel:
    """A new type; ``Conflict`` (409 ``MODEL_EXISTS``) when one has its name, written or not."""
    spec = checked(body, policy)
    if await session.get(ModelTypeModel, body.name) is not None:
        raise Conflict(f"model type {body.name!r} already exists", code="MODEL_EXISTS")
    row = ModelTypeModel(name=body.name, created_at=utcnow())
    _write(row, body, spec)
    row.updated_at = row.created_at
    session.add(row)
    try:
        await session.flush()
    except IntegrityError:
        # Another create of the same name committed in between.
        raise Conflict(f"model type {body.name!r} already exists", code="MODEL_EXISTS") from None
    return row


async def replace_type(session: AsyncSession, name: str, body: ModelTypeIn, policy: SpecPolicy) -> ModelTypeModel:
    """Every field of type ``name`` replaced by ``body``'s (the same name: a type is not renamed)."""
    if body.name != name:
        raise InvalidRequest(f"the body's name {body.name!r} is not the path's {name!r}: a type is not renamed",
                             code="NAME_MISMATCH")
    spec = checked(body, policy)
    row = await get_type(session, name)
    _write(row, body, spec)
    row.updated_at = utcnow()
    return row


async def delete_type(session: AsyncSession, name: str) -> None:
    """The type only: services made from it keep their specs (and ``spec.model``)."""
    await session.delete(await get_type(session, name))


async def register(session: AsyncSession, bodies: Sequence[ModelTypeIn], policy: SpecPolicy) -> list[tuple[str, bool]]:
    """Create or replace each type (a catalog file), all or none: each name with whether it was new."""
    names = [b.name for b in bodies]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidRequest(f"model types named twice: {', '.join(twice)}", {"names": twice},
                             code="INVALID_MODEL_TYPE")
    specs = [checked(b, policy) for b in bodies]
    found = {r.name: r for r in await session.scalars(select(ModelTypeModel).where(ModelTypeModel.name.in_(names)))}
    now = utcnow()
    done = []
    for body, spec in zip(bodies, specs, strict=True):
        row = found.get(body.name)
        if row is None:
            row = ModelTypeModel(name=body.name, created_at=now)
            session.add(row)
        _write(row, body, spec)
        row.updated_at = now
        done.append((body.name, body.name not in found))
    return done


def type_out(row: ModelTypeModel) -> ModelTypeOut:
    rest = dict(row.spec)
    return ModelTypeOut(
        name=row.name, task=row.task, description=row.description, image=row.image, resources=row.resources,
        replicas=row.replicas, probe=row.probe, ports=rest.pop("ports", {}), health_check=rest.pop("health_check", None),
        environment=rest.pop("env", {}), spec=rest, created_at=row.created_at, updated_at=row.updated_at,
    )


async def model_spec(db: Database, given: ServiceSpec) -> ServiceSpec:
    """The spec of a create that names a model type (``given.model``): each field the create left out is the
    type's, ``env`` merged (the create's variables win). ``NotFound`` (404 ``MODEL_NOT_FOUND``) for an unknown
    type; a merged spec that is not valid is refused as an invalid body would be (422 ``VALIDATION_ERROR``)."""
    assert given.model is not None
    async with db.session() as session:
        row = await session.get(ModelTypeModel, given.model)
    if row is None:
        raise _not_found(given.model)
    fields: dict[str, Any] = {"image": row.image, "resources": row.resources, "replicas": row.replicas,
                              "probe": row.probe, **row.spec}
    asked = given.model_dump(mode="json", exclude_unset=True)
    if asked.get("image") is None:
        asked.pop("image", None)
    env = {**row.spec.get("env", {}), **asked.get("env", {})}
    fields.update(asked)
    fields["env"] = env
    try:
        return ServiceSpec.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) \
            from None
