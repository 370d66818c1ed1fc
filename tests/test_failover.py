"""Failure handling with real processes, the real Docker engine and real
PostgreSQL, at short timings (1 s heartbeat, 3 s grace): controllers killed
and frozen, the hub killed half-way through a drain, two hub replicas, and
PostgreSQL restarted under load."""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from examples.images import EXAMPLE_IMAGE
from tests.support.pg import create_database, local_cluster
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, api, running_copies, stopped_after

pytestmark = pytest.mark.slow

SPEC = {"image": EXAMPLE_IMAGE, "ports": {"5000": None}, "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "fo")


@pytest.fixture
def deployment(db_url: str, example_image: str, docker_client: docker.DockerClient,
               tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalDeployment]:
    dep = LocalDeployment(db_url, tmp_path)
    with stopped_after(dep, request, docker_client):
        yield dep


def three_controllers(dep: LocalDeployment, hubs: int = 1) -> tuple[httpx.Client, list[str]]:
    dep.plan_hubs(hubs)
    ids = [dep.add_controller(name).name for name in ("alpha", "beta", "gamma")]
    token = dep.create_admin()
    dep.start(hubs)
    client = api(dep.hub(0).url, token)
    wait_until(lambda: all(c["status"] == "healthy" for c in client.get("/api/admin/controllers").json()), 20,
               what="all controllers healthy")
    return client, ids


def presence_streams(dep: LocalDeployment) -> float:
    metrics = httpx.get(f"{dep.hub(0).url}/metrics").text
    return next(float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith("mmanager_presence_streams "))


def settled(client: httpx.Client, expected: set[str], avoid: str | None = None) -> list[dict[str, Any]] | None:
    services = client.get("/api/services").json()
    if {s["id"] for s in services} != expected:
        return None
    if all(s["status"] == "running" and s["controller_id"] != avoid for s in services):
        return services
    return None


def assert_exactly_one_copy(docker_client: docker.DockerClient, services: list[dict[str, Any]],
                            within: float = 0) -> None:
    """Each service runs once, where the hub says; ``within``: stale or orphan copies may take that long to go."""
    wait_until(lambda: all(len(running_copies(docker_client, s["id"])) == 1 for s in services), within or 0.5,
               what="one running copy per service")
    for s in services:
        copies = running_copies(docker_client, s["id"])
        assert [c.id for c in copies] == [s["container_id"]], (s["name"], [c.name for c in copies])
        assert copies[0].labels["mmanager.controller"] == s["controller_id"]
        assert copies[0].labels["mmanager.epoch"] == str(s["epoch"])


def test_controller_killed_while_services_are_created(deployment: LocalDeployment,
                                                      docker_client: docker.DockerClient) -> None:
    client, ids = three_controllers(deployment)
    # Acknowledged creates, still running in the background when the controller dies.
    acknowledged = []
    for i in range(12):
        answer = client.post("/api/root/lab/services", params={"wait": "false"}, json={**SPEC, "name": f"kill-{i}"})
        assert answer.status_code == 202, answer.text
        acknowledged.append(answer.json()["service_id"])
    victim = ids[0]
    wait_until(lambda: docker_client.containers.list(filters={"label": f"mmanager.controller={victim}"}), 20,
               what="a container on the victim")
    deployment.controllers[victim].kill()
    # The server is gone with its containers. Docker may still finish a start the dead process
    # asked for (here every controller shares one engine), so look twice.
    for _ in range(2):
        for c in docker_client.containers.list(filters={"label": f"mmanager.controller={victim}"}):
            c.kill()
        time.sleep(1)

    services = wait_until(lambda: settled(client, set(acknowledged), avoid=victim), 40, what="every service running")
    assert_exactly_one_copy(docker_client, services)
    moved = [s for s in services if s["epoch"] > 1]
    failovers = client.get("/api/admin/operations", params={"operation": "failover"}).json()
    assert {o["service_id"] for o in failovers if o["status"] == "succeeded"} >= {s["id"] for s in moved}
    assert all(o["actor"] == "system" and o["controller_id"] != victim for o in failovers if o["status"] == "succeeded")
    victim_row = client.get(f"/api/admin/controllers/{victim}").json()
    assert victim_row["status"] == "unhealthy"
    registry = client.get("/api/admin/containers", params={"limit": 1000}).json()
    current = {(r["service_id"], r["controller_id"]) for r in registry if r["status"] == "running"}
    assert current == {(s["id"], s["controller_id"]) for s in services}
    metrics = httpx.get(f"{deployment.hub(0).url}/metrics").text
    if moved:
        assert f"mmanager_failovers_total {float(len(moved))}" in metrics


def test_frozen_controller_comes_back_and_its_stale_copies_go(deployment: LocalDeployment,
                                                              docker_client: docker.DockerClient) -> None:
    client, ids = three_controllers(deployment)
    created = [client.post("/api/root/lab/services", json={**SPEC, "name": f"frz-{i}"}).json() for i in range(6)]
    by_controller = collections.Counter(s["controller_id"] for s in created)
    victim = by_controller.most_common(1)[0][0]
    on_victim = [s for s in created if s["controller_id"] == victim]
    proc = deployment.controllers[victim]
    proc.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: settled(client, {s["id"] for s in created}, avoid=victim), 30,
                   what="services moved off the frozen controller")
    finally:
        proc.signal(signal.SIGCONT)
    # While it was frozen its old copies kept running: two copies for a moment, by design (it was unreachable).
    wait_until(lambda: all(len(running_copies(docker_client, s["id"])) == 1 for s in on_victim),
               deployment.interval + 3, interval=0.1, what="every stale copy removed")
    assert_exactly_one_copy(docker_client, [client.get(f"/api/services/{s['id']}").json() for s in created])
    for s in on_victim:
        old = [c for c in docker_client.containers.list(all=True, filters={"label": f"mmanager.service={s['id']}"})
               if c.labels["mmanager.controller"] == victim]
        assert old == [], "stale copies are removed, not only stopped"
    wait_until(lambda: client.get(f"/api/admin/controllers/{victim}").json()["status"] == "healthy", 10,
               what="the controller healthy again")
    # Its stale registry rows are gone with the containers.
    wait_until(lambda: not [r for r in client.get("/api/admin/containers", params={"limit": 1000}).json()
                          if r["status"] == "stale"], 10, what="stale registry rows released")


def test_hub_killed_during_a_drain_converges(deployment: LocalDeployment, docker_client: docker.DockerClient) -> None:
    client, ids = three_controllers(deployment)
    target = ids[0]
    created = [client.post("/api/root/lab/services", json={**SPEC, "name": f"drn-{i}"}).json() for i in range(6)]
    # Put everything on one controller first, so the drain has work to do.
    for s in created:
        if s["controller_id"] != target:
            moved = client.post(f"/api/admin/containers/{_entry(client, s)}/migrate",
                                json={"target_controller": target})
            assert moved.status_code == 200, moved.text
    drain = client.post(f"/api/admin/controllers/{target}/drain", params={"wait": "false"})
    assert drain.status_code == 202, drain.text
    time.sleep(0.6)
    deployment.hub(0).kill()
    deployment.hub(0).start().wait_listening(30)

    ids_created = {s["id"] for s in created}
    services = wait_until(lambda: settled(client, ids_created, avoid=target), 40, what="drain finished after restart")
    # A copy the killed hub had started may be adopted, or removed as an orphan after its grace.
    assert_exactly_one_copy(docker_client, services, within=15)
    controller = wait_until(lambda: (c := client.get(f"/api/admin/controllers/{target}").json())["status"] != "draining"
                            and c, 20, what="drain done")
    assert controller["enabled"] is False
    assert not docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={target}"})
    ops = client.get("/api/admin/operations", params={"controller_id": target, "operation": "drain"}).json()
    assert [o["status"] for o in ops] == ["succeeded"]
    # Nothing left pending: interrupted operations were failed cleanly and their work finished.
    assert not client.get("/api/admin/operations", params={"status": "running"}).json()


def _entry(client: httpx.Client, service: dict[str, Any]) -> str:
    rows = client.get("/api/admin/containers", params={"service_id": service["id"]}).json()
    return next(r["id"] for r in rows if r["container_id"] == service["container_id"])


def test_second_replica_takes_over_failure_detection(deployment: LocalDeployment,
                                                     docker_client: docker.DockerClient) -> None:
    client, ids = three_controllers(deployment, hubs=2)
    first, second = deployment.hub(0), deployment.hub(1)
    assert httpx.get(f"{first.url}/health").json()["leader"] is True
    assert httpx.get(f"{second.url}/health").json()["leader"] is False
    backup = api(second.url, client.headers["Authorization"].split()[1])
    created = [backup.post("/api/root/lab/services", json={**SPEC, "name": f"rep-{i}"}).json() for i in range(4)]
    assert all(s["status"] == "running" for s in created)

    first.kill()
    wait_until(lambda: httpx.get(f"{second.url}/health").json()["leader"], deployment.grace + 2, interval=0.1,
               what="the second replica leading")
    # Controllers keep beating to the replica that is left, so none is lost for the hub's death.
    time.sleep(deployment.grace + 1)
    assert all(c["status"] == "healthy" for c in backup.get("/api/admin/controllers").json())

    victim = created[0]["controller_id"]
    deployment.controllers[victim].kill()
    services = wait_until(lambda: settled(backup, {s["id"] for s in created}, avoid=victim), 30,
                          what="failover run by the second replica")
    failovers = backup.get("/api/admin/operations", params={"operation": "failover"}).json()
    assert failovers and all(o["status"] == "succeeded" for o in failovers)
    assert {s["id"] for s in services if s["epoch"] > 1} == {o["service_id"] for o in failovers}


@pytest.mark.postgres  # a cluster of its own, to stop and start
def test_postgres_down_longer_than_the_grace_under_load(example_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    with local_cluster() as pg:
        db_url = asyncio.run(create_database(pg.url, "pgr"))
        dep = LocalDeployment(db_url, tmp_path)
        try:
            client, _ = three_controllers(dep)
            acknowledged: list[str] = []
            statuses: collections.Counter[int] = collections.Counter()
            stop = threading.Event()

            def load() -> None:
                with api(dep.hub(0).url, client.headers["Authorization"].split()[1]) as c:
                    i = 0
                    while not stop.is_set():
                        try:
                            answer = c.post("/api/root/lab/services", json={**SPEC, "name": f"pg-{i}"}, timeout=20)
                            statuses[answer.status_code] += 1
                            if answer.status_code == 201:
                                acknowledged.append(answer.json()["id"])
                            statuses[c.get("/api/services", timeout=20).status_code] += 1
                        except httpx.TransportError:
                            statuses[0] += 1
                        i += 1
                        time.sleep(0.05)

            worker = threading.Thread(target=load)
            worker.start()
            try:
                wait_until(lambda: len(acknowledged) >= 3, 30, what="some creates before the restart")
                pg.stop()
                # Longer than the grace: heartbeats cannot be recorded meanwhile, yet no controller may
                # be declared lost for the database's outage.
                time.sleep(dep.grace + 1.5)
                down = dict(statuses)
                pg.start()
                wait_until(lambda: client.get("/api/services").status_code == 200, 30, what="the hub answering again")
                before = len(acknowledged)
                wait_until(lambda: len(acknowledged) > before + 2, 30, what="creates succeeding again")
            finally:
                stop.set()
                worker.join(60)
            assert statuses[503] > 0, f"the hub should answer 503 while the database is down: {down}"
            assert statuses[500] == 0, dict(statuses)
            services = wait_until(lambda: settled(client, set(acknowledged) | {
                s["id"] for s in client.get("/api/services").json()}), 40, what="every acknowledged service running")
            assert set(acknowledged) <= {s["id"] for s in services}
            assert_exactly_one_copy(docker_client, services)
            assert client.get("/api/admin/operations", params={"operation": "failover"}).json() == []
            assert all(c["status"] == "healthy" for c in client.get("/api/admin/controllers").json())
        except AssertionError:
            dep.hub(0).signal(signal.SIGUSR1)
            time.sleep(1)
            print(dep.logs())
            for s in client.get("/api/services").json():
                if s["status"] != "running":
                    print(s, client.get("/api/admin/operations", params={"service_id": s["id"]}).json())
            raise
        finally:
            dep.stop(docker_client)


@pytest.fixture
def long_grace(db_url: str, example_image: str, docker_client: docker.DockerClient,
               tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalDeployment]:
    """1 s heartbeats and a 6 s grace: what presence (controller.presence) detects shows well inside it."""
    dep = LocalDeployment(db_url, tmp_path, interval=1.0, grace=6.0)
    with stopped_after(dep, request, docker_client):
        yield dep


def test_a_killed_controller_fails_over_well_within_the_grace(long_grace: LocalDeployment,
                                                             docker_client: docker.DockerClient) -> None:
    dep = long_grace
    client, ids = three_controllers(dep)
    created = [client.post("/api/root/lab/services", json={**SPEC, "name": f"pre-{i}"}).json() for i in range(3)]
    victim = created[0]["controller_id"]
    moving = {s["id"] for s in created if s["controller_id"] == victim}
    # What notices the kill at once is the victim's presence stream: the controllers open theirs after their first
    # heartbeat, which may come after the creates (all processes start together).
    wait_until(lambda: presence_streams(dep) == 3, 20, what="the three presence streams open")
    killed = time.monotonic()
    dep.controllers[victim].kill()
    services = wait_until(lambda: settled(client, {s["id"] for s in created}, avoid=victim), dep.grace / 2,
                          interval=0.05, what="the services running elsewhere within half the grace")
    took = time.monotonic() - killed
    print(f"kill -9 to every service running elsewhere: {took:.2f} s (grace {dep.grace:g} s)")
    row = client.get(f"/api/admin/controllers/{victim}").json()
    assert row["status"] == "unhealthy" and "refuses connections" in row["error"], row
    failovers = client.get("/api/admin/operations", params={"operation": "failover"}).json()
    assert {o["service_id"] for o in failovers if o["status"] == "succeeded"} == moving
    assert {s["id"] for s in services if s["epoch"] > 1} == moving
    metrics = httpx.get(f"{dep.hub(0).url}/metrics").text
    assert 'mmanager_controllers_suspected_total{outcome="confirmed"} 1.0' in metrics
    # The live controllers' streams end with the hub: it stops at once, not after uvicorn's wait for them.
    stopping = time.monotonic()
    dep.hub(0).stop()
    # (uvicorn raises the SIGTERM it caught again once it has shut down: -15, where a SIGKILL would be -9.)
    assert dep.hub(0).popen is not None and dep.hub(0).popen.returncode == -signal.SIGTERM
    assert time.monotonic() - stopping < 5


def test_a_controller_stopped_gracefully_is_left_to_the_grace(long_grace: LocalDeployment,
                                                             docker_client: docker.DockerClient) -> None:
    dep = long_grace
    client, ids = three_controllers(dep)
    created = [client.post("/api/root/lab/services", json={**SPEC, "name": f"bye-{i}"}).json() for i in range(3)]
    victim = created[0]["controller_id"]
    stopped = time.monotonic()
    dep.controllers[victim].stop()  # SIGTERM: its presence stream ends with bye
    row = wait_until(lambda: (c := client.get(f"/api/admin/controllers/{victim}").json())["status"] == "unhealthy"
                     and c, dep.grace + 5, interval=0.1, what="the controller lost after the grace")
    took = time.monotonic() - stopped
    # Silence counts from its last beat, up to an interval before the SIGTERM.
    assert took > dep.grace - dep.interval - 0.5, took
    assert row["error"].startswith("no heartbeat"), row
    metrics = httpx.get(f"{dep.hub(0).url}/metrics").text
    assert 'mmanager_controllers_suspected_total{outcome="confirmed"} 0.0' in metrics
    wait_until(lambda: settled(client, {s["id"] for s in created}, avoid=victim), 30, what="the failover after it")
