"""Prometheus and Grafana: the shipped scrape config and alert rules checked and unit-tested with the real
``promtool``; the hub's ``http_sd`` endpoint; a real Prometheus server scraping a real hub and controller
found through it; and the Grafana dashboard's queries checked against the metrics the hub, a controller and
a gateway (HAProxy with its latency histograms) really expose."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from controller.app import create_app as create_controller_app
from controller.config import ControllerSettings
from hub.app import build_hub, create_app
from hub.config import HubSettings
from hub.db import Database
from hub.services.users import create_user
from tests.support.alertmanager import alertmanager_server, webhook
from tests.support.haproxy import latency_exposition
from tests.support.net import free_port, terminate
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, stopped_after

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
KEY = "prometheus-test-key-" + "k" * 24
SD_TOKEN = "sd-token-" + uuid.uuid4().hex
SEED_ALERTS = {"HighContainerLoad", "ControllerDown", "FailoverHappened", "ServiceUnhealthy", "HighMemory"}
SEED_METRICS = ("mmanager_containers_running", "mmanager_load_percentage", "mmanager_memory_usage_percent")
METRIC = re.compile(r"\bmmanager_[a-z0-9_]+\b")


def promtool(*args: str | Path) -> str:
    done = subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


# ------------------------------------------------------------------ promtool


def test_scrape_config_and_alert_rules_pass_promtool_checks() -> None:
    out = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out
    assert f"SUCCESS: {len(alert_rules())} rules found" in promtool("check", "rules", PROMETHEUS / "alerts.yml")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    sd = config["scrape_configs"][0]["http_sd_configs"][0]
    assert sd["url"].endswith("/api/admin/prometheus/targets")
    assert "credentials_file" in sd["authorization"]


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    rules = alert_rules()
    assert set(rules) >= SEED_ALERTS
    seed = rules["HighContainerLoad"]
    assert "mmanager_load_percentage" in seed["expr"] and "> 90" in seed["expr"] and seed["for"] == "5m"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert f"docs/OPERATIONS.md#alerts ({name})" in rule["annotations"]["description"], name

    files = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert "SUCCESS" in promtool("test", "rules", *files)
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in files:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case["alert_rule_test"]:
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(rules), "alerts without a firing test: " + ", ".join(sorted(set(rules) - firing))
    assert quiet == set(rules), "alerts without a not-firing test: " + ", ".join(sorted(set(rules) - quiet))


# ------------------------------------------------------------------ the http_sd endpoint, in process


@contextlib.asynccontextmanager
async def hub_client(url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    hub_settings = HubSettings(_env_file=None, database_url=url, api_key=KEY, **settings)
    app = create_app(hub_settings, hub=build_hub(hub_settings, db=Database(url), transport=httpx.MockTransport(
        lambda request: httpx.Response(503))), run_loops=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub.test:8000") as client:
            yield client


CONTROLLERS = [
    {"id": "gpu-1", "url": "http://10.1.2.3:8001", "server_type": "gpu"},
    # Behind a TLS proxy under a path prefix, and disabled: still scraped, where it really answers.
    {"id": "edge-1", "url": "https://edge.example.org/mm/", "server_type": "edge", "enabled": False},
]


async def test_targets_lists_hubs_and_controllers_for_admins_and_the_prometheus_token(db: Database) -> None:
    async with db.session() as session:
        _, admin = await create_user(session, "root", is_admin=True)
        _, user = await create_user(session, "alice")
    async with hub_client(db.url, controllers=json.dumps(CONTROLLERS), prometheus_token=SD_TOKEN) as client:
        answers = {}
        for name, token in (("admin", admin), ("prometheus", SD_TOKEN)):
            answer = await client.get("/api/admin/prometheus/targets", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "application/json"
            answers[name] = answer.json()
        assert answers["admin"] == answers["prometheus"] == [
            # No MMANAGER_PUBLIC_URL: the hub as this call reached it.
            {"targets": ["hub.test:8000"],
             "labels": {"job": "mmanager-hub", "__scheme__": "http", "__metrics_path__": "/metrics"}},
            {"targets": ["edge.example.org:443"],
             "labels": {"job": "mmanager-controller", "controller": "edge-1", "server_type": "edge",
                        "__scheme__": "https", "__metrics_path__": "/mm/metrics"}},
            {"targets": ["10.1.2.3:8001"],
             "labels": {"job": "mmanager-controller", "controller": "gpu-1", "server_type": "gpu",
                        "__scheme__": "http", "__metrics_path__": "/metrics"}},
        ]

        refusals = {
            "none": ({}, 401, "UNAUTHORIZED"),
            "wrong": ({"Authorization": "Bearer " + SD_TOKEN + "x"}, 401, "UNAUTHORIZED"),
            "user": ({"Authorization": f"Bearer {user}"}, 403, "ADMIN_REQUIRED"),
        }
        for name, (headers, status, code) in refusals.items():
            answer = await client.get("/api/admin/prometheus/targets", headers=headers)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), name
        # The discovery token reaches nothing else.
        for path in ("/api/admin/controllers", "/api/services", "/api/admin/operations"):
            answer = await client.get(path, headers={"Authorization": f"Bearer {SD_TOKEN}"})
            assert answer.status_code == 401, path


async def test_targets_lists_every_public_hub_url(db: Database) -> None:
    async with db.session() as session:
        _, admin = await create_user(session, "root", is_admin=True)
    replicas = "http://hub-a.lab:8000, https://hub.lab/mmanager"
    async with hub_client(db.url, public_url=replicas) as client:
        answer = await client.get("/api/admin/prometheus/targets", headers={"Authorization": f"Bearer {admin}"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == [
        {"targets": ["hub-a.lab:8000"],
         "labels": {"job": "mmanager-hub", "__scheme__": "http", "__metrics_path__": "/metrics"}},
        {"targets": ["hub.lab:443"],
         "labels": {"job": "mmanager-hub", "__scheme__": "https", "__metrics_path__": "/mmanager/metrics"}},
    ]


async def test_targets_lists_the_gateways_two_exporters(db: Database) -> None:
    async with db.session() as session:
        _, admin = await create_user(session, "root", is_admin=True)
    async with hub_client(db.url) as client:
        gateway = {"Authorization": f"Bearer {KEY}"}
        for gid, report in (("gw-a", {"url": "http://gw-a.lab:8080", "metrics_url": "http://gw-a.lab:8081",
                                      "version": 1}),
                            ("gw-b", {"url": "http://gw-b.lab:8080", "version": 1})):
            assert (await client.put(f"/api/gateways/{gid}", json=report, headers=gateway)).status_code == 204
        answer = await client.get("/api/admin/prometheus/targets", headers={"Authorization": f"Bearer {admin}"})
    assert answer.status_code == 200, answer.text
    # gw-b said nowhere to scrape it.
    assert [group for group in answer.json() if group["labels"]["job"] == "mmanager-gateway"] == [
        {"targets": ["gw-a.lab:8081"], "labels": {"job": "mmanager-gateway", "gateway": "gw-a", "__scheme__": "http",
                                                  "__metrics_path__": path}}
        for path in ("/metrics", "/metrics/latency")
    ]


def test_unfit_prometheus_settings_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValidationError) as refused:
        HubSettings(api_key=KEY, prometheus_token="changeme")
    assert "MMANAGER_PROMETHEUS_TOKEN is unfit" in str(refused.value) and "changeme" not in str(refused.value)
    with pytest.raises(ValidationError):
        HubSettings(api_key=KEY, public_url="hub.lab:8000")
    assert HubSettings(api_key=KEY, prometheus_token="").prometheus_token is None


# ------------------------------------------------------------------ a real Prometheus server


@pytest.fixture
async def prom_db_url(pg_server: str) -> str:
    return await create_database(pg_server, "prom")


@pytest.fixture
def deployment(prom_db_url: str, docker_client: docker.DockerClient, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[LocalDeployment]:
    dep = LocalDeployment(prom_db_url, tmp_path / "mm", extra_hub_env={"MMANAGER_PROMETHEUS_TOKEN": SD_TOKEN})
    with stopped_after(dep, request, docker_client):
        yield dep


@contextlib.contextmanager
def prometheus_server(tmp_path: Path, hub_url: str, alertmanager: str | None = None,
                      rules: Path = PROMETHEUS / "alerts.yml") -> Iterator[httpx.Client]:
    """The shipped prometheus.yml with this deployment's hub, the token in a file and 1 s intervals; its alerts
    go to ``alertmanager`` (a base URL), or nowhere."""
    token_file = tmp_path / "mmanager_prometheus_token"
    token_file.write_text(SD_TOKEN + "\n")
    token_file.chmod(0o600)
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    if alertmanager is None:
        del config["alerting"]
    else:
        config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager.split("//", 1)[1]]}]
    sd = config["scrape_configs"][0]["http_sd_configs"][0]
    sd.update(url=f"{hub_url}/api/admin/prometheus/targets", refresh_interval="1s")
    sd["authorization"]["credentials_file"] = str(token_file)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            # Until its storage and configuration are loaded, Prometheus answers 503 "Service Unavailable".
            wait_until(lambda: client.get("/-/ready").raise_for_status(), 20, what="Prometheus ready")
            yield client
    except BaseException:
        print((tmp_path / "prometheus.log").read_text()[-4000:])
        raise
    finally:
        terminate(proc)
        log.close()


def series(prom: httpx.Client, query: str) -> list[dict[str, Any]]:
    answer = prom.get("/api/v1/query", params={"query": query})
    answer.raise_for_status()
    return answer.json()["data"]["result"]


def test_prometheus_finds_and_scrapes_the_hub_and_a_controller(deployment: LocalDeployment, tmp_path: Path) -> None:
    deployment.plan_hubs(1)
    cid = deployment.add_controller("prom").name
    deployment.start()
    started = time.monotonic()
    with prometheus_server(tmp_path, deployment.hub(0).url) as prom:
        def targets_up() -> dict[str, dict[str, Any]] | None:
            active = prom.get("/api/v1/targets", params={"state": "active"}).raise_for_status().json()["data"]["activeTargets"]
            by_job = {t["labels"]["job"]: t for t in active}
            return by_job if len(active) == 2 and all(t["health"] == "up" for t in active) else None

        targets = wait_until(targets_up, 25, interval=0.5, what="the hub and the controller up in Prometheus")
        hub, controller = targets["mmanager-hub"], targets["mmanager-controller"]
        assert hub["scrapeUrl"] == f"{deployment.hub(0).url}/metrics"
        assert controller["scrapeUrl"] == f"{deployment.controllers[cid].url}/metrics"
        assert controller["labels"]["controller"] == cid and controller["labels"]["server_type"] == "cpu"

        def seed_series() -> dict[str, list[dict[str, Any]]] | None:
            found = {m: series(prom, f'{m}{{job="mmanager-controller", controller="{cid}"}}') for m in SEED_METRICS}
            found["mmanager_controller_up"] = series(prom, f'mmanager_controller_up{{controller="{cid}"}} == 1')
            return found if all(found.values()) else None

        found = wait_until(seed_series, max(1.0, 30 - (time.monotonic() - started)), interval=0.5,
                           what="the seed's metrics in Prometheus")
        assert found["mmanager_controller_up"][0]["metric"]["job"] == "mmanager-hub"
        assert float(found["mmanager_memory_usage_percent"][0]["value"][1]) > 0
        # One `controller` label, no `exported_controller` copy (honor_labels).
        assert series(prom, '{exported_controller!=""}') == []
        # The rules loaded, and with one healthy controller none of them fires.
        rules = prom.get("/api/v1/rules").json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} == set(alert_rules())
        assert series(prom, 'ALERTS{alertstate="firing"}') == []


def test_a_controller_that_stops_answering_reaches_the_webhook_through_alertmanager(
        deployment: LocalDeployment, tmp_path: Path) -> None:
    """The shipped ControllerDown rule (its expression, labels and annotations; only its minute's wait dropped)
    fires for a controller killed for real, and the alert reaches the test's webhook through a real
    Alertmanager run with the shipped configuration (critical: the receiver that emails too)."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    [down] = [rule for group in rules["groups"] for rule in group["rules"] if rule.get("alert") == "ControllerDown"]
    del down["for"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    deployment.plan_hubs(1)
    cid = deployment.add_controller("down").name
    deployment.start()
    with webhook() as hook, alertmanager_server(tmp_path, hook.url) as alertmanager, \
            prometheus_server(tmp_path, deployment.hub(0).url, alertmanager, tmp_path / "alerts.yml") as prom:
        wait_until(lambda: series(prom, f'mmanager_controller_up{{controller="{cid}"}} == 1'), 25, interval=0.25,
                   what="the controller up in Prometheus")
        killed = datetime.now(UTC)
        deployment.controllers[cid].kill()
        alert = hook.alert(lambda notification, alert: notification["receiver"] == "webhook-and-email"
                           and alert["status"] == "firing" and alert["labels"]["alertname"] == "ControllerDown"
                           and alert["labels"].get("controller") == cid
                           and datetime.fromisoformat(alert["startsAt"]) >= killed, 30)
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == f"Controller {cid} is down"
    assert "docs/OPERATIONS.md#alerts" in alert["annotations"]["description"]


# ------------------------------------------------------------------ Grafana


def exposed_names(text: str) -> set[str]:
    """Every series name an exposition can carry, including those of families with no sample yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


async def live_metric_names(db: Database, workdir: Path) -> set[str]:
    """What the hub, a controller and a gateway's latency histograms (a real HAProxy) expose."""
    async with hub_client(db.url) as client:
        hub_text = (await client.get("/metrics")).text
    settings = ControllerSettings(_env_file=None, api_key=KEY, server_id=f"prom-{uuid.uuid4().hex[:6]}", gpu_devices=[])
    app = create_controller_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as client:
            controller_text = (await client.get("/metrics")).text
    gateway_text = await asyncio.to_thread(latency_exposition, workdir)
    return exposed_names(hub_text) | exposed_names(controller_text) | exposed_names(gateway_text)


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    queries = []
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has an empty query"
            queries.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        queries.append(variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"])
    return queries


async def test_grafana_dashboard_queries_name_metrics_the_hub_controllers_and_gateways_expose(
        db: Database, tmp_path: Path) -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / "mmanager.json").read_text())
    queries = dashboard_queries(dashboard)
    used = {name for query in queries for name in METRIC.findall(query)}
    assert used >= {"mmanager_load_percentage", "mmanager_controller_up", "mmanager_failovers_total",
                    "mmanager_operation_duration_seconds_bucket", "mmanager_container_cpu_percent",
                    "mmanager_container_memory_bytes", "mmanager_gateway_request_duration_seconds_bucket",
                    "mmanager_gpu_utilization_percent", "mmanager_gpu_memory_used_bytes", "mmanager_gpu_lost"}
    exposed = await live_metric_names(db, tmp_path)
    assert used - exposed == set(), "the dashboard queries metrics nobody exposes"
    rule_names = {name for rule in alert_rules().values() for name in METRIC.findall(rule["expr"])}
    assert rule_names - exposed == set(), "the alert rules name metrics nobody exposes"

    # Every query is valid PromQL: promtool parses them as recording rules, Grafana's variables filled in.
    filled = [q.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$controller", ".*")
              .replace("$service", ".*") for q in queries if not q.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": q}
                                                       for i, q in enumerate(filled)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", tmp_path / "dashboard-rules.yml")

    # Provisioning: the datasource every panel names, and a provider for the dashboards folder.
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasource["datasources"] if d["type"] == "prometheus"}
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"} <= uids
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "mmanager.yml").read_text())
    assert provider["providers"][0]["type"] == "file" and provider["providers"][0]["options"]["path"]
