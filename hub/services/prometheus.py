"""Prometheus HTTP service discovery (``http_sd``): which hubs, controllers and gateways to scrape.

Pure: it turns URLs into target groups. Each group sets ``job`` itself (a target's own ``job``
label wins over the scrape job's name), so one ``http_sd_configs`` job scrapes hubs and
controllers alike; ``__scheme__`` and ``__metrics_path__`` come from the URL, so a controller
behind a path prefix or on https is scraped where it really answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from hub.errors import HubError
from hub.models import ControllerModel, GatewayModel

HUB_JOB = "mmanager-hub"
CONTROLLER_JOB = "mmanager-controller"
GATEWAY_JOB = "mmanager-gateway"
# A gateway's two exporters under its metrics URL: HAProxy's own, and the latency histograms.
GATEWAY_PATHS = ("/metrics", "/metrics/latency")


def scrape_address(url: str) -> tuple[str, dict[str, str]]:
    """``host:port`` and the ``__scheme__``/``__metrics_path__`` labels for a base URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HubError(f"not an http(s) URL: {url!r}", code="BAD_URL")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}", {"__scheme__": parts.scheme, "__metrics_path__": parts.path.rstrip("/") + "/metrics"}


def sd_targets(hub_urls: Iterable[str], controllers: Iterable[ControllerModel],
               gateways: Iterable[GatewayModel] = ()) -> list[dict[str, Any]]:
    """One target group per hub replica and per controller, and two per gateway, in a stable order.

    A controller whose stored URL cannot be scraped (it does not parse) is left out rather than
    failing discovery for everyone: Prometheus drops the whole answer on any error.
    """
    groups: list[dict[str, Any]] = []
    for url in hub_urls:
        target, labels = scrape_address(url)
        groups.append({"targets": [target], "labels": {"job": HUB_JOB, **labels}})
    for controller in controllers:
        try:
            target, labels = scrape_address(controller.url)
        except HubError:
            continue
        groups.append({
            "targets": [target],
            "labels": {"job": CONTROLLER_JOB, "controller": controller.id, "server_type": controller.server_type,
                       **labels},
        })
    for gateway in gateways:
        if not gateway.metrics_url:
            continue
        try:
            target, labels = scrape_address(gateway.metrics_url)
        except HubError:
            continue
        base = labels["__metrics_path__"].removesuffix("/metrics")
        for path in GATEWAY_PATHS:
            groups.append({"targets": [target], "labels": {"job": GATEWAY_JOB, "gateway": gateway.id, **labels,
                                                           "__metrics_path__": base + path}})
    return groups
