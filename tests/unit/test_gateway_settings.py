"""The gateway agent's settings: what is filled in when not given, and the metrics URL a compose deployment
sets apart from the advertised one (Prometheus reaches the gateway by another name than users do)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.settings import GatewaySettings

BASE = {"MMANAGER_HUB_URL": "http://hub:8000", "MMANAGER_API_KEY": "k" * 32}


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MMANAGER_GATEWAY_PORT", "MMANAGER_GATEWAY_METRICS_PORT", "MMANAGER_GATEWAY_ADVERTISE_URL",
                 "MMANAGER_GATEWAY_METRICS_URL", "MMANAGER_GATEWAY_ID", "MMANAGER_GATEWAY_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the developer's


def test_the_metrics_url_follows_the_advertised_host_and_the_metrics_port() -> None:
    settings = GatewaySettings(**BASE, MMANAGER_GATEWAY_ADVERTISE_URL="http://models.lab.example:9000")
    assert settings.metrics_port == 8081
    assert settings.metrics_url == "http://models.lab.example:8081"
    assert settings.id == f"{socket.gethostname()}-8080"


def test_a_metrics_url_of_its_own_wins_and_a_blank_one_is_unset() -> None:
    settings = GatewaySettings(**BASE, MMANAGER_GATEWAY_ADVERTISE_URL="http://localhost:8080",
                               MMANAGER_GATEWAY_METRICS_URL="http://gateway:8081")
    assert settings.advertise_url == "http://localhost:8080"
    assert settings.metrics_url == "http://gateway:8081"
    settings = GatewaySettings(**BASE, MMANAGER_GATEWAY_ADVERTISE_URL="http://localhost:8080",
                               MMANAGER_GATEWAY_METRICS_URL=" ")
    assert settings.metrics_url == "http://localhost:8081"


def test_the_same_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**BASE, "MMANAGER_GATEWAY_PORT": "9080", "MMANAGER_GATEWAY_METRICS_PORT": "9090",
                        "MMANAGER_GATEWAY_METRICS_URL": "http://gateway:9090"}.items():
        monkeypatch.setenv(name, value)
    settings = GatewaySettings()  # type: ignore[call-arg]
    assert (settings.port, settings.metrics_port) == (9080, 9090)
    assert settings.metrics_url == "http://gateway:9090"
    assert settings.advertise_url == f"http://{socket.gethostname()}:9080"
