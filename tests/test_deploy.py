"""The deployment files: compose files that docker-compose accepts, shell scripts that parse, a systemd
unit that systemd accepts, the native install script's help and refusal, and the hub image's entrypoint
(waits for the database, migrates, serves) run for real against the test PostgreSQL.

Building the images themselves takes minutes on a fresh machine (debootstrap), so it is not part of
`make test`: `make images` builds them, docs/OPERATIONS.md#building-the-images shows how they were
checked.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.support.net import free_port
from tests.support.pg import create_database
from tests.support.poll import eventually

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"

ROOT_ENV = {
    "MMANAGER_API_KEY": secrets.token_hex(32),
    "POSTGRES_PASSWORD": secrets.token_hex(16),
    "MMANAGER_PROMETHEUS_TOKEN": secrets.token_hex(32),
    "MMANAGER_HUB_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(8),
}
CONTROLLER_ENV = {
    "MMANAGER_API_KEY": secrets.token_hex(32),
    "SERVER_ID": "mmanager-gpu-01",
    "SERVER_TYPE": "gpu",
    "MAX_CONTAINERS": "30",
    "MMANAGER_HUB_URL": "http://hub.example:8000",
    "CONTROLLER_URL": "http://192.0.2.10:8001",
}


def _compose_config(file: Path, env: dict[str, str], tmp_path: Path, *more: Path) -> subprocess.CompletedProcess[str]:
    # An empty --env-file: a developer's own .env must not fill in what the test leaves out.
    empty = tmp_path / "empty.env"
    empty.touch()
    clean = {k: v for k, v in os.environ.items() if k not in ROOT_ENV and k not in CONTROLLER_ENV}
    files = [arg for path in (file, *more) for arg in ("-f", str(path))]
    return subprocess.run(
        ["docker-compose", "--env-file", str(empty), *files, "config"],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.docker  # docker-compose
def test_root_compose_file_validates_with_the_stack(tmp_path: Path) -> None:
    result = _compose_config(ROOT / "docker-compose.yml", ROOT_ENV, tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(services) == {"hub", "postgres", "prometheus", "alertmanager", "grafana", "controller", "gateway"}
    assert services["postgres"]["image"] == "postgres:16"
    assert (services["hub"]["build"]["dockerfile"], services["hub"]["build"]["target"]) == ("deploy/Dockerfile", "hub")
    assert services["hub"]["build"]["args"]["BASE_IMAGE"] == "mmanager/python-base:bookworm"
    hub_env = services["hub"]["environment"]
    assert hub_env["MMANAGER_DATABASE_URL"] == (
        f"postgresql+asyncpg://mmanager:{ROOT_ENV['POSTGRES_PASSWORD']}@postgres:5432/mmanager")
    assert hub_env["MMANAGER_API_KEY"] == ROOT_ENV["MMANAGER_API_KEY"]
    assert hub_env["MMANAGER_HUB_KEY"] == ROOT_ENV["MMANAGER_HUB_KEY"]
    controller = services["controller"]
    assert (controller["build"]["dockerfile"], controller["build"]["target"]) == ("deploy/Dockerfile", "controller")
    assert any(v.startswith("/var/run/docker.sock:/var/run/docker.sock") for v in controller["volumes"])
    assert controller["environment"]["MMANAGER_API_KEY"] == ROOT_ENV["MMANAGER_API_KEY"]
    # Prometheus and Grafana get engineer G's files, at the paths those files name.
    prometheus_mounts = services["prometheus"]["volumes"]
    assert any(str(DEPLOY / "prometheus/prometheus.yml") in str(v) for v in prometheus_mounts)
    assert any(str(DEPLOY / "prometheus/alerts.yml") in str(v) for v in prometheus_mounts)
    grafana_mounts = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert f"{DEPLOY / 'grafana/provisioning'}:/etc/grafana/provisioning" in grafana_mounts
    assert f"{DEPLOY / 'grafana/dashboards'}:/var/lib/grafana/dashboards" in grafana_mounts
    for path in ("prometheus/prometheus.yml", "prometheus/alerts.yml", "grafana/provisioning", "grafana/dashboards",
                 "alertmanager/alertmanager.yml", "alertmanager/Dockerfile"):
        assert (DEPLOY / path).exists(), path


@pytest.mark.docker  # docker-compose
def test_root_compose_file_runs_alertmanager_for_prometheus_and_the_hub(tmp_path: Path) -> None:
    """Alertmanager built here from Debian's package, with the shipped configuration, its SMTP password as a
    secret at the path that configuration reads, and both senders pointed at it by its compose name."""
    result = _compose_config(ROOT / "docker-compose.yml", ROOT_ENV, tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    am = services["alertmanager"]
    assert am["build"]["context"] == str(DEPLOY / "alertmanager")
    assert am["build"]["args"]["BASE_IMAGE"] == "mmanager/python-base:bookworm"
    assert f"{DEPLOY / 'alertmanager/alertmanager.yml'}:/etc/alertmanager/alertmanager.yml:ro" in am["volumes"]
    assert "alertmanager-data:/var/lib/alertmanager:rw" in am["volumes"]
    assert _published(am) == {"9093": "9093"} and all(str(p).startswith("127.0.0.1:") for p in am["ports"])
    assert [s["source"] for s in am["secrets"]] == ["alertmanager_smtp_password"]
    assert config["secrets"]["alertmanager_smtp_password"]["file"] == str(DEPLOY / "secrets/smtp_password")
    shipped = yaml.safe_load((DEPLOY / "alertmanager/alertmanager.yml").read_text())
    assert shipped["global"]["smtp_auth_password_file"] == "/run/secrets/alertmanager_smtp_password"
    # The image's command reads the mounted file and keeps its state in the volume.
    dockerfile = (DEPLOY / "alertmanager/Dockerfile").read_text()
    assert "apt-get install -y -qq --no-install-recommends prometheus-alertmanager" in dockerfile
    assert "ARG BASE_IMAGE=mmanager/python-base:bookworm\nFROM ${BASE_IMAGE}\n" in dockerfile
    for flag in ("--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/var/lib/alertmanager",
                 "--web.listen-address=:9093", "--cluster.listen-address="):
        assert f'"{flag}"' in dockerfile, flag
    # Prometheus and the hub send to it.
    assert "alertmanager" in services["prometheus"]["depends_on"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    assert services["hub"]["environment"]["MMANAGER_ALERTMANAGER_URL"] == "http://alertmanager:9093"
    assert "alertmanager-data" in config["volumes"]


def _amtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["amtool", *map(str, args)], capture_output=True, text=True, timeout=30)


def test_shipped_alertmanager_config_passes_amtool_and_emails_critical_alerts_too(tmp_path: Path) -> None:
    shipped = DEPLOY / "alertmanager/alertmanager.yml"
    result = _amtool("check-config", shipped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 receivers" in result.stdout
    # Where an alert goes, by amtool's reading of the routes.
    for labels, receiver in ((["alertname=ControllerDown", "severity=critical"], "webhook-and-email"),
                             (["alertname=MManagerUsageHigh", "kind=cpu", "severity=warning"], "webhook")):
        result = _amtool("config", "routes", "test", f"--config.file={shipped}", *labels)
        assert result.returncode == 0 and result.stdout.strip() == receiver, (labels, result.stdout, result.stderr)
    receivers = {r["name"]: r for r in yaml.safe_load(shipped.read_text())["receivers"]}
    assert all(hook["send_resolved"] for r in receivers.values() for hook in r.get("webhook_configs", ()))
    [email] = receivers["webhook-and-email"]["email_configs"]
    assert email["send_resolved"] and receivers["webhook-and-email"]["webhook_configs"] == \
        receivers["webhook"]["webhook_configs"]
    # And the check can fail: a misspelt field is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text(shipped.read_text().replace("send_resolved:", "send_resolve:", 1))
    result = _amtool("check-config", broken)
    assert result.returncode != 0 and "send_resolve" in result.stdout + result.stderr


def _published(service: dict[str, Any]) -> dict[str, str]:
    """Container port -> published port, from either of docker-compose's spellings."""
    ports = {}
    for port in service["ports"]:
        if isinstance(port, dict):
            ports[str(port["target"])] = str(port["published"])
        else:
            *_, published, target = str(port).split(":")
            ports[target.removesuffix("/tcp")] = published
    return ports


@pytest.mark.docker  # docker-compose
def test_root_compose_file_keeps_the_model_store_on_a_named_volume(tmp_path: Path) -> None:
    """Recreating the hub container keeps the uploaded model files: the store is a named volume."""
    result = _compose_config(ROOT / "docker-compose.yml", ROOT_ENV, tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    hub = config["services"]["hub"]
    store = hub["environment"]["MMANAGER_MODEL_STORE"]
    # Either of docker-compose's spellings: {type, source, target} or "source:target[:mode]".
    mounts = [(v["source"], v["target"]) if isinstance(v, dict) else tuple(str(v).split(":")[:2])
              for v in hub.get("volumes", ())]
    assert ("hub-models", store) in mounts, mounts
    assert "hub-models" in config["volumes"]


@pytest.mark.docker  # docker-compose
def test_root_compose_file_runs_a_gateway_following_the_hub(tmp_path: Path) -> None:
    result = _compose_config(ROOT / "docker-compose.yml", ROOT_ENV, tmp_path)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    gateway = services["gateway"]
    assert (gateway["build"]["dockerfile"], gateway["build"]["target"]) == ("deploy/Dockerfile", "gateway")
    env = gateway["environment"]
    assert env["MMANAGER_HUB_URL"] == "http://hub:8000"
    assert env["MMANAGER_API_KEY"] == services["hub"]["environment"]["MMANAGER_API_KEY"]
    # Users get the published port; Prometheus, on the compose network, the metrics port by name.
    assert env["MMANAGER_GATEWAY_ADVERTISE_URL"] == "http://localhost:8080"
    assert env["MMANAGER_GATEWAY_METRICS_URL"] == f"http://gateway:{env['MMANAGER_GATEWAY_METRICS_PORT']}"
    assert _published(gateway) == {env["MMANAGER_GATEWAY_PORT"]: "8080", env["MMANAGER_GATEWAY_METRICS_PORT"]: "8081"}
    # The replicas are at the controller's host (host networking): that name must resolve in the gateway.
    assert "host.docker.internal:host-gateway" in gateway["extra_hosts"]
    assert any(str(v).endswith(":/var/lib/mmanager/gateway:rw") for v in gateway["volumes"])
    # The settings the operator sets in .env reach it, and the hub's gateway settings reach the hub.
    more = {**ROOT_ENV, "MMANAGER_GATEWAY_ADVERTISE_URL": "http://models.lab.example", "GATEWAY_PORT": "9080",
            "MMANAGER_GATEWAY_URL": "http://lb.lab.example", "MMANAGER_SERVICE_DOMAIN": "models.lab.example"}
    result = _compose_config(ROOT / "docker-compose.yml", more, tmp_path)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["gateway"]["environment"]["MMANAGER_GATEWAY_ADVERTISE_URL"] == "http://models.lab.example"
    assert _published(services["gateway"])["8080"] == "9080"
    assert services["hub"]["environment"]["MMANAGER_GATEWAY_URL"] == "http://lb.lab.example"
    assert services["hub"]["environment"]["MMANAGER_SERVICE_DOMAIN"] == "models.lab.example"


@pytest.mark.docker  # docker-compose
@pytest.mark.parametrize("missing", sorted(ROOT_ENV))
def test_root_compose_file_refuses_to_run_without_each_secret(missing: str, tmp_path: Path) -> None:
    env = {k: v for k, v in ROOT_ENV.items() if k != missing}
    result = _compose_config(ROOT / "docker-compose.yml", env, tmp_path)
    assert result.returncode != 0
    assert missing in result.stderr


@pytest.mark.docker  # docker-compose
def test_controller_compose_file_validates_with_the_seed_variables(tmp_path: Path) -> None:
    result = _compose_config(DEPLOY / "controller/docker-compose.yml", CONTROLLER_ENV, tmp_path)
    assert result.returncode == 0, result.stderr
    controller = yaml.safe_load(result.stdout)["services"]["controller"]
    env = controller["environment"]
    for name, value in CONTROLLER_ENV.items():
        assert env[name] == value, name
    assert env["MMANAGER_CONTROLLER_KEY_FILE"] == ""  # unset: heartbeats carry MMANAGER_API_KEY
    assert controller["network_mode"] == "host"
    assert controller["restart"] == "always"
    assert any(v.startswith("/var/run/docker.sock:/var/run/docker.sock") for v in controller["volumes"])

    # On a GPU server the override gives the controller the NVIDIA driver's utility library (NVML).
    result = _compose_config(DEPLOY / "controller/docker-compose.yml", CONTROLLER_ENV, tmp_path,
                             DEPLOY / "controller/docker-compose.gpu.yml")
    assert result.returncode == 0, result.stderr
    gpu = yaml.safe_load(result.stdout)["services"]["controller"]
    assert gpu["environment"]["SERVER_TYPE"] == "gpu"
    assert gpu["pid"] == "host"  # the VRAM watch maps NVML's host pids to containers
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["capabilities"]) == ("nvidia", ["utility"])

    result = _compose_config(DEPLOY / "controller/docker-compose.yml",
                             {k: v for k, v in CONTROLLER_ENV.items() if k != "MMANAGER_API_KEY"}, tmp_path)
    assert result.returncode != 0 and "MMANAGER_API_KEY" in result.stderr


def test_dockerfiles_build_from_the_local_base_image() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=mmanager/python-base:bookworm\nFROM ${BASE_IMAGE} AS app\n" in text
    # One file, the two images as targets on the shared stage: what the compose files and `make images` build.
    assert "FROM app AS hub\n" in text and "FROM app AS controller\n" in text and "FROM app AS gateway\n" in text
    assert "COPY gateway gateway\n" in text
    # The gateway's image has HAProxy, from Debian, without the recommended extras, and runs the agent.
    assert "apt-get install -y -qq --no-install-recommends haproxy" in text
    assert 'ENTRYPOINT ["mmanager", "gateway", "serve"]' in text
    # Everything the images COPY gets through .dockerignore, and secrets do not.
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # nothing else (.env, .venv, .git, databases) goes to the engine
    for path in ("pyproject.toml", "README.md", "alembic.ini", "migrations", "hub", "controller", "mmanager",
                 "gateway", "deploy/hub/entrypoint.sh"):
        assert f"!{path}" in ignore, path
    assert not any(".env" in line or ".git" in line for line in ignore)


@pytest.mark.parametrize("script", ["scripts/build-base-image.sh", "scripts/build-modelserver-image.sh",
                                    "deploy/controller/install.sh", "deploy/hub/entrypoint.sh"])
def test_scripts_parse(script: str) -> None:
    shell = "sh" if script.endswith("entrypoint.sh") else "bash"
    result = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


def test_base_image_script_help() -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts/build-base-image.sh"), "--help"],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    assert "debootstrap" in result.stdout and "--force" in result.stdout


@pytest.mark.docker  # docker-compose
def test_model_service_compose_files_validate_cpu_and_gpu(tmp_path: Path) -> None:
    """The reference model services standalone, and the GPU override asking each for an NVIDIA device."""
    cpu = _compose_config(DEPLOY / "modelserver/docker-compose.yml", {}, tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    services = yaml.safe_load(cpu.stdout)["services"]
    assert {name: s["environment"]["MODEL_TYPE"] for name, s in services.items()} == {
        "dnabert2": "dnabert2", "lucaone": "lucaone", "evo2": "evo2"}
    assert all(s["image"] == "mmanager/modelserver:latest" for s in services.values())
    gpu = _compose_config(DEPLOY / "modelserver/docker-compose.yml", {}, tmp_path,
                          DEPLOY / "modelserver/docker-compose.gpu.yml")
    assert gpu.returncode == 0, gpu.stderr
    services = yaml.safe_load(gpu.stdout)["services"]
    for name in ("dnabert2", "lucaone"):
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert services[name]["image"] == "mmanager/modelserver:gpu"
    # The GPU image is the CPU one's service with CUDA torch: same package, same weights step, same command.
    cpu_file = (DEPLOY / "modelserver/Dockerfile").read_text()
    gpu_file = (DEPLOY / "modelserver/Dockerfile.gpu").read_text()
    for line in ("RUN python -m modelserver.weights --out /opt/modelserver/models && python -c \"import modelserver.app\"",
                 'CMD ["python", "-m", "modelserver"]', "USER modelserver"):
        assert line in cpu_file and line in gpu_file, line


def test_model_service_image_script_help() -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts/build-modelserver-image.sh"), "--help"],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    assert "--gpu" in result.stdout and "torch" in result.stdout


def test_systemd_unit_is_accepted_by_systemd(tmp_path: Path) -> None:
    unit = (DEPLOY / "controller/mmanager-controller.service").read_text()
    for directive in ("User=mmanager", "SupplementaryGroups=docker", "EnvironmentFile=/etc/mmanager/controller.env",
                      "Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert re.search(rf"^{re.escape(directive)}$", unit, re.M), directive
    # The Docker socket is an AF_UNIX socket: the address families must keep it.
    families = re.search(r"^RestrictAddressFamilies=(.*)$", unit, re.M)
    assert families and "AF_UNIX" in families.group(1).split()

    result = _verify_unit(unit, tmp_path, "mmanager-controller.service")
    assert result.returncode == 0, result.stderr
    # And the check can fail: a misspelt directive is refused.
    result = _verify_unit(unit.replace("Restart=always", "Restart=allways"), tmp_path, "broken.service")
    assert "allways" in result.stderr


def test_install_script_help_and_refusal_without_root(tmp_path: Path) -> None:
    script = str(DEPLOY / "controller/install.sh")
    result = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    assert "/opt/mmanager" in result.stdout and "/etc/mmanager/controller.env" in result.stdout

    env = {**os.environ, "MMANAGER_INSTALL_UID": "1000", "MMANAGER_PREFIX": str(tmp_path / "opt"),
           "MMANAGER_ETC": str(tmp_path / "etc"), "SYSTEMD_DIR": str(tmp_path / "systemd")}
    result = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    assert "must run as root" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written

    result = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2 and "unknown argument" in result.stderr


def _entrypoint_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMANAGER_")}
    return {**env, "PATH": f"{VENV_BIN}:{env['PATH']}", "MMANAGER_DATABASE_URL": url,
            "MMANAGER_API_KEY": secrets.token_hex(32), **extra}


def test_hub_entrypoint_gives_up_on_a_missing_database_without_showing_its_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    password = "s3cret-" + secrets.token_hex(8)
    url = f"postgresql+asyncpg://mmanager:{password}@127.0.0.1:{port}/mmanager"
    # It gives up after its wait (MMANAGER_DB_WAIT), well within the 15 s it is given here.
    result = subprocess.run([str(DEPLOY / "hub/entrypoint.sh")], env=_entrypoint_env(url, MMANAGER_DB_WAIT="1"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=15)
    assert result.returncode == 1
    assert f"database 127.0.0.1:{port}/mmanager did not answer in time" in result.stderr
    assert password not in result.stderr + result.stdout


async def test_hub_entrypoint_migrates_then_serves(pg_server: str, tmp_path: Path) -> None:
    url = await create_database(pg_server, "entrypoint")
    port = free_port()
    proc = subprocess.Popen([str(DEPLOY / "hub/entrypoint.sh"), "--host", "127.0.0.1", "--port", str(port)],
                            env=_entrypoint_env(url), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        async with httpx.AsyncClient() as client:
            async def health_or_exit() -> dict[str, Any]:
                if proc.poll() is not None:
                    return {"exited": proc.returncode}
                return (await client.get(f"http://127.0.0.1:{port}/health", timeout=2)).json()

            health = await eventually(health_or_exit, 20, "the hub's /health", interval=0.1,
                                      retry_on=(httpx.HTTPError,))
        assert "exited" not in health, proc.communicate(timeout=5)[0]
        assert health["status"] == "healthy" and health["database"] is True
        # `mmanager db upgrade` ran: the schema is at the newest revision.
        u = make_url(url)
        conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
        try:
            version = await conn.fetchval("SELECT version_num FROM alembic_version")
        finally:
            await conn.close()
        heads = sorted(p.name.split("_")[3] for p in (ROOT / "migrations/versions").glob("*.py"))
        assert version == heads[-1]
        # The hub runs as the entrypoint's own process (exec), so `docker stop` reaches it.
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[1:4] == [
            str(VENV_BIN / "mmanager").encode(), b"hub", b"serve"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_hub_entrypoint_runs_another_command_when_given_one(tmp_path: Path) -> None:
    result = subprocess.run([str(DEPLOY / "hub/entrypoint.sh"), "mmanager", "db", "--help"],
                            env=_entrypoint_env("sqlite+aiosqlite:///./x.db"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "upgrade" in result.stdout
    assert shutil.which("mmanager", path=str(VENV_BIN))


def test_gateway_systemd_unit_is_accepted_by_systemd(tmp_path: Path) -> None:
    unit = (DEPLOY / "gateway/mmanager-gateway.service").read_text()
    for directive in ("User=mmanager", "EnvironmentFile=/etc/mmanager/gateway.env", "Restart=always",
                      "NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=mmanager mmanager/gateway"):
        assert re.search(rf"^{re.escape(directive)}$", unit, re.M), directive
    assert "--state-dir /var/lib/mmanager/gateway" in unit
    result = _verify_unit(unit, tmp_path, "mmanager-gateway.service")
    assert result.returncode == 0, result.stderr


def _verify_unit(unit: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of a unit file's text. It also checks that ExecStart exists: the unit's
    /opt/mmanager/venv/bin/mmanager is pointed at a stand-in."""
    fake = tmp_path / "mmanager"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    path = tmp_path / name
    path.write_text(unit.replace("/opt/mmanager/venv/bin/mmanager", str(fake)))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
