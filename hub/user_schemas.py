"""The users API's bodies (docs/API.md, Users and Your tokens): users as admins see them, their patch, and
tokens, whose value appears only in ``TokenCreated``."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from hub.schemas import MAX_MEMORY, NAME_PATTERN, StrictModel
from mmanager.wire import parse_memory

TOKEN_NAME = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)


class Quotas(BaseModel):
    """Service replicas, GPUs and bytes of memory; null: the hub's default (in ``quotas``), no limit (in
    ``limits``)."""

    services: int | None
    gpus: int | None
    memory_bytes: int | None


class Usage(BaseModel):
    services: int
    gpus: int
    memory_bytes: int


class UserOut(BaseModel):
    username: str
    is_admin: bool
    disabled: bool
    disabled_at: datetime | None
    created_at: datetime
    # The services they own (not replicas), and their tokens not revoked.
    services: int
    active_tokens: int
    # Their own quotas (null: the hub's default), the limits in force, and what their services ask for.
    quotas: Quotas
    limits: Quotas
    usage: Usage


class QuotasPatch(StrictModel):
    """A merge patch: a field left out stays, null goes back to the hub's default."""

    services: int | None = Field(default=None, ge=0, le=1_000_000)
    gpus: int | None = Field(default=None, ge=0, le=1_000_000)
    # A size ("16G", "512MB") or bytes.
    memory: str | int | None = None

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | int | None) -> str | int | None:
        if value is None:
            return None
        if isinstance(value, int) and value == 0:
            return 0
        size = parse_memory(value)
        if size > 1024 * MAX_MEMORY:
            raise ValueError("a memory quota is at most 4PB")
        return size


class UserPatch(StrictModel):
    disabled: bool | None = None
    quotas: QuotasPatch | None = None


class UserDeleted(BaseModel):
    """What a user's delete did with their services (names), and to whom they went."""

    username: str
    services: Literal["delete", "transfer"] | None
    deleted: list[str]
    transferred: list[str]
    to: str | None


class TokenIn(StrictModel):
    name: str = TOKEN_NAME


class TokenOut(BaseModel):
    """A token as listed: never the token itself, shown once, at its creation or rotation."""

    id: int
    name: str | None
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str
