"""``GET /api/admin/prometheus/targets``: Prometheus HTTP service discovery of the hubs, controllers and gateways.

It answers an admin token, or the token in ``MMANAGER_PROMETHEUS_TOKEN``, which reaches nothing else:
the Prometheus server (often a separate monitoring host, alongside Grafana) then holds a key that
reveals where the controllers are, not one that can stop or delete every service, and that key can
be written into configuration before the hub's database has any user in it.
"""

from __future__ import annotations

import hmac
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from hub.deps import HubDep, SessionDep, bearer, get_current_user
from hub.errors import Forbidden
from hub.models import ControllerModel, GatewayModel, utcnow
from hub.services.prometheus import sd_targets
from mmanager.audit import identify

router = APIRouter(prefix="/api/admin/prometheus", tags=["admin"])

PROMETHEUS_ACTOR = "prometheus"
# How long a gateway that stopped reporting stays a target.
SCRAPED_FOR = timedelta(hours=1)


async def prometheus_reader(request: Request, hub: HubDep) -> str:
    """Who asks: ``prometheus`` for the discovery token, else an admin user's name."""
    token = bearer(request)
    expected = hub.settings.prometheus_token
    if expected is not None and hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        identify(request, PROMETHEUS_ACTOR)
        return PROMETHEUS_ACTOR
    user = await get_current_user(request, hub)
    if not user.is_admin:
        raise Forbidden("this needs an admin token or MMANAGER_PROMETHEUS_TOKEN", code="ADMIN_REQUIRED")
    return user.username


PrometheusReader = Annotated[str, Depends(prometheus_reader)]


@router.get("/targets")
async def targets(request: Request, _: PrometheusReader, hub: HubDep, session: SessionDep) -> list[dict[str, Any]]:
    """The ``http_sd`` answer: every hub replica (``MMANAGER_PUBLIC_URL``, else the URL this call came to),
    every registered controller, enabled or not (a disabled one still runs services), and the gateways."""
    hub_urls = hub.settings.public_urls or [str(request.base_url)]
    controllers = await session.scalars(select(ControllerModel).order_by(ControllerModel.id))
    # Gateways heard from lately: one gone for good drops out; one down for a while is scraped as down.
    gateways = await session.scalars(select(GatewayModel).where(GatewayModel.last_seen_at >= utcnow() - SCRAPED_FOR)
                                     .order_by(GatewayModel.id))
    return sd_targets(hub_urls, controllers, gateways)
