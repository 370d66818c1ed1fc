"""``GET /api/admin/prometheus/targets``: Prometheus HTTP service discovery of the hubs, controllers and gateways.

It answers an admin token, or the token in ``MMANAGER_PROMETHEUS_TOKEN``, which reaches nothing else:
the Prometheus server (often a separate monitoring host, alongside Grafana) then holds a key that
reveals where the controllers are, not one that can stop or delete every service, and that key can
be written into configuration before the hub's database has any user in it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from hub.deps import HubDep, SessionDep, key_or_admin
from hub.models import ControllerModel, GatewayModel, utcnow
from hub.services.prometheus import sd_targets

router = APIRouter(prefix="/api/admin/prometheus", tags=["admin"])

PROMETHEUS_ACTOR = "prometheus"
# How long a gateway that stopped reporting stays a target.
SCRAPED_FOR = timedelta(hours=1)


async def prometheus_reader(request: Request, hub: HubDep) -> str:
    """Who asks: ``prometheus`` for the discovery token, else an admin user's name."""
    return await key_or_admin(request, hub, hub.settings.prometheus_token, PROMETHEUS_ACTOR,
                              "this needs an admin token or MMANAGER_PROMETHEUS_TOKEN")


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
