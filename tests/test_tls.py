"""TLS with real processes: a hub and a controller both on HTTPS with mutual TLS, certificates
from a throwaway CA; and the settings refused at start-up when they cannot work."""

from __future__ import annotations

import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
import trustme
from pydantic import ValidationError

from controller.config import ControllerSettings
from examples.images import EXAMPLE_IMAGE
from hub.config import HubSettings
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, stopped_after

KEY = secrets.token_hex(32)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: the CA, a server certificate for 127.0.0.1 and localhost, a client certificate,
    and a certificate from another CA."""
    out = tmp_path_factory.mktemp("pki")
    files = {"ca": out / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, issued in [("server", ca.issue_cert("127.0.0.1", "localhost")),
                         ("client", ca.issue_cert("alice@example.org")),
                         ("stranger", trustme.CA().issue_cert("127.0.0.1"))]:
        files[f"{name}.crt"], files[f"{name}.key"] = out / f"{name}.crt", out / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(files[f"{name}.crt"]))
        issued.private_key_pem.write_to_path(str(files[f"{name}.key"]))
    return files


def client_context(pki: dict[str, Path], cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        context.load_cert_chain(pki[f"{cert}.crt"], pki[f"{cert}.key"])
    return context


# ------------------------------------------------------------------ settings


def both(**env: str | Path) -> list[str]:
    """What the hub's and the controller's settings say about the same TLS environment."""
    values = {f"MMANAGER_TLS_{k.upper()}": str(v) for k, v in env.items()}
    errors = []
    for build in (lambda: HubSettings(api_key=KEY, **{k.removeprefix("MMANAGER_").lower(): v
                                                      for k, v in values.items()}),
                  lambda: ControllerSettings(MMANAGER_API_KEY=KEY, **values)):
        with pytest.raises(ValidationError) as caught:
            build()
        errors.append(str(caught.value))
    return errors


def test_settings_that_cannot_work_are_refused_at_start_up(pki: dict[str, Path], tmp_path: Path) -> None:
    for error in both(cert=pki["server.crt"]):
        assert "MMANAGER_TLS_CERT and MMANAGER_TLS_KEY go together" in error
    for error in both(key=pki["server.key"]):
        assert "MMANAGER_TLS_CERT and MMANAGER_TLS_KEY go together" in error
    for error in both(cert=pki["server.crt"], key=pki["server.key"], client_auth="true"):
        assert "MMANAGER_TLS_CLIENT_AUTH needs MMANAGER_TLS_CA" in error
    for error in both(ca=pki["ca"], client_auth="true"):
        assert "client certificates can only be required over HTTPS" in error
    for error in both(cert=pki["server.crt"], key=pki["client.key"]):
        assert "cannot load the certificate and its key" in error
    for error in both(cert=pki["server.crt"], key=tmp_path / "missing.key"):
        assert "No such file or directory" in error
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for error in both(ca=not_pem):
        assert f"MMANAGER_TLS_CA={not_pem}: not a readable PEM CA bundle" in error
    # From the command line: the message, not a traceback.
    done = subprocess.run([sys.executable, "-m", "mmanager.cli", "controller", "serve"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "MMANAGER_API_KEY": KEY,
                                          "MMANAGER_TLS_CERT": str(pki["server.crt"])}, timeout=60)
    assert done.returncode == 2
    assert "MMANAGER_TLS_CERT and MMANAGER_TLS_KEY go together" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr

    settings = ControllerSettings(MMANAGER_API_KEY=KEY, PORT=8443, MMANAGER_TLS_CERT=str(pki["server.crt"]),
                                  MMANAGER_TLS_KEY=str(pki["server.key"]))
    assert settings.controller_url.startswith("https://") and settings.controller_url.endswith(":8443")


# ------------------------------------------------------------- real processes


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "tls")


@pytest.fixture
def deployment(db_url: str, pki: dict[str, Path], example_image: str, docker_client: docker.DockerClient,
               tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalDeployment]:
    tls = {"MMANAGER_TLS_CERT": str(pki["server.crt"]), "MMANAGER_TLS_KEY": str(pki["server.key"]),
           "MMANAGER_TLS_CA": str(pki["ca"]), "MMANAGER_TLS_CLIENT_AUTH": "true"}
    dep = LocalDeployment(db_url, tmp_path, tls_env=tls)
    with stopped_after(dep, request, docker_client):
        yield dep


def test_hub_and_controller_on_mutual_tls(deployment: LocalDeployment, pki: dict[str, Path],
                                          docker_client: docker.DockerClient) -> None:
    deployment.plan_hubs(1)
    # Not in MMANAGER_CONTROLLERS: the hub learns of it only through its heartbeats.
    cid = deployment.add_controller("tls", listed=False).name
    token = deployment.create_admin()
    deployment.start()
    hub_url = deployment.hub().url
    assert hub_url.startswith("https://")
    with httpx.Client(base_url=hub_url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                      verify=client_context(pki, "client")) as api:

        def joined() -> dict | None:
            return next((c for c in api.get("/api/admin/controllers").json()
                         if c["id"] == cid and c["status"] == "healthy"), None)

        controller = wait_until(joined, 20, what="the controller's heartbeats to reach the hub")
        assert controller["url"].startswith("https://")

        # The hub calls the controller over HTTPS, presenting its certificate; the container answers.
        created = api.post("/api/root/lab/services", json={
            "name": "tls", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
            "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}})
        assert created.status_code == 201, created.text
        service = created.json()
        assert service["controller_id"] == cid and service["status"] == "running"
        assert service["url"].startswith("http://127.0.0.1:")
        answer = wait_until(lambda: httpx.get(f"{service['url']}/health", timeout=2), 10, what="the service to answer")
        assert answer.json() == {"status": "healthy"}

        # A client that does not trust our CA refuses the hub's certificate.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{hub_url}/health", verify=ssl.create_default_context())

        # Clients that trust the CA but present no certificate, or one from another CA, are refused in the
        # handshake: not even a valid token or key gets a request through, and nothing is created.
        calls = [(hub_url, "/api/root/lab/services", token),
                 (deployment.controllers[cid].url, "/containers/", deployment.key)]
        for cert in (None, "stranger"):
            for base, path, secret in calls:
                with httpx.Client(base_url=base, verify=client_context(pki, cert), timeout=10,
                                  headers={"Authorization": f"Bearer {secret}"}) as anonymous:
                    with pytest.raises(httpx.TransportError):
                        anonymous.post(path, json={"name": "anonymous", "image": EXAMPLE_IMAGE})
        assert [s["name"] for s in api.get("/api/services").json()] == ["tls"]
        managed = docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={cid}"})
        assert [c.id for c in managed] == [service["container_id"]]

    # SIGTERM stops the hub by itself, though the controller keeps an idle TLS connection to it that never
    # answers the hub's close_notify (Proc.stop kills what is still running 15 s after its SIGTERM).
    hub = deployment.hub()
    hub.stop()
    assert hub.popen is not None and hub.popen.returncode == -signal.SIGTERM
