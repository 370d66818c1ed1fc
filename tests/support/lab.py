"""A lab as the end-to-end tests run it: the hub, two controllers (``a`` and ``b``) and a gateway (``gw``) as
real processes on real PostgreSQL and the real Docker engine, with an admin's token; stopped (and its
containers removed) when the test ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest

from mmanager.client import Client
from tests.support.procs import LocalDeployment, api, sdk, stopped_after


@dataclass
class Lab:
    dep: LocalDeployment
    token: str

    @property
    def gateway(self) -> str:
        return self.dep.gateways["gw"].url

    def hub(self) -> httpx.Client:
        """The admin's raw HTTP client (status codes and bodies as they are)."""
        return api(self.dep.hub().url, self.token)

    def client(self, token: str | None = None) -> Client:
        """The SDK's client, as the admin or as the user whose ``token`` is given."""
        return sdk(self.dep.hub().url, token or self.token)


@contextmanager
def running_lab(db_url: str, tmp_path: Path, request: pytest.FixtureRequest,
                docker_client: docker.DockerClient, gpus: dict[str, str] | None = None,
                hub_env: dict[str, str] | None = None, controller_env: dict[str, str] | None = None) -> Iterator[Lab]:
    """``gpus``: a controller's name -> its GPU_DEVICES (it is then a ``gpu`` server); ``hub_env``,
    ``controller_env``: settings on top, for the hub and for every controller."""
    dep = LocalDeployment(db_url, tmp_path, extra_hub_env={"MMANAGER_RATE_LIMIT": "0", **(hub_env or {})},
                          extra_controller_env=dict(controller_env or {}))
    dep.plan_hubs(1)
    for name in ("a", "b"):
        devices = (gpus or {}).get(name)
        dep.add_controller(name, server_type="gpu" if devices else "cpu", gpus=devices)
    dep.add_gateway()
    token = dep.create_admin()
    dep.start()
    with stopped_after(dep, request, docker_client):
        yield Lab(dep, token)
