"""Hub key rotation: every value the hub stores sealed (a service's ``registry_auth_sealed`` and
``secrets_sealed``) sealed again under the current hub key (``mmanager hub-key rotate``).

Invariant: a value is rewritten only once it opened (under the previous key its id names) and was sealed
again under the current one, with the same associated data, under its row's lock; one that does not open is
left as it is and named (by its service and column, never anything of its content). Run while hubs serve:
they open the previous key's values and the new ones alike (``MMANAGER_HUB_KEY_PREVIOUS``, docs/OPERATIONS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.models import ServiceModel
from hub.sealing import Sealer, SealError
from hub.services import registry_auth, secrets

_S = ServiceModel.__table__
# What seals each column's values again: (sealer, value, service id) -> the new value, None when current.
_RESEAL: dict[str, Callable[[Sealer, str, str], str | None]] = {
    "registry_auth_sealed": registry_auth.reseal,
    "secrets_sealed": secrets.reseal,
}


@dataclass
class Rotation:
    """What a rotation did: values sealed again, values already under the current key, and those that did
    not open (``service id: column``)."""

    key_id: str
    resealed: int = 0
    current: int = 0
    failed: list[str] = field(default_factory=list)


async def rotate(session: AsyncSession, sealer: Sealer) -> Rotation:
    """Seal every stored sealed value again under ``sealer``'s current key, in ``session``'s transaction."""
    done = Rotation(sealer.key_id)
    columns = [_S.c[name] for name in _RESEAL]
    rows = (await session.execute(
        select(_S.c.id, *columns).where(or_(*(c.isnot(None) for c in columns))).order_by(_S.c.id)
        .with_for_update())).mappings().all()
    for row in rows:
        changed: dict[str, str] = {}
        for name, reseal in _RESEAL.items():
            value = row[name]
            if value is None:
                continue
            try:
                again = reseal(sealer, value, row["id"])
            except SealError:
                done.failed.append(f"{row['id']}: {name}")
                continue
            if again is None:
                done.current += 1
            else:
                changed[name] = again
        if changed:
            await session.execute(update(_S).where(_S.c.id == row["id"]).values(changed))
            done.resealed += len(changed)
    return done
