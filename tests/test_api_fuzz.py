"""The hub's OpenAPI, fuzzed with schemathesis against real processes (hub,
controller, PostgreSQL, Docker): thousands of generated and mutated requests,
none may answer 5xx. Then the database and every log are searched for the
tokens and keys that went by: none may appear in clear.

The seed is fixed so CI is reproducible; ``MM_FUZZ_SEED=<n>`` explores others.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from examples.images import EXAMPLE_IMAGE
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import MMANAGER, LocalDeployment, api, stopped_after

pytestmark = pytest.mark.slow

SEED = os.environ.get("MM_FUZZ_SEED", "20261123")
ST = str(Path(sys.executable).with_name("st"))


@pytest.fixture
async def db_url(pg_server: str) -> str:
    return await create_database(pg_server, "fuzz")


@pytest.fixture
def deployment(db_url: str, example_image: str, docker_client: docker.DockerClient, tmp_path: Path,
               request: pytest.FixtureRequest) -> Any:
    dep = LocalDeployment(db_url, tmp_path / "deploy", interval=1.0, grace=5.0,
                          extra_hub_env={"MMANAGER_RATE_LIMIT": "0", "MMANAGER_MAX_SERVICES_PER_USER": "3",
                                         # Fuzzed jobs start real containers: as few as services.
                                         "MMANAGER_MAX_JOBS_PER_USER": "3",
                                         # A fuzzed drain or migrate has nowhere to go: answer 202 soon.
                                         "MMANAGER_DRAIN_TIMEOUT": "3", "MMANAGER_HEALTH_TIMEOUT": "5"})
    with stopped_after(dep, request, docker_client):
        yield dep


def fuzz(url: str, token: str, workdir: Path, name: str, examples: int,
         parameters: dict[str, str] | None = None,
         per_path: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """One schemathesis run (every phase) checking only for server errors; its JSON report. ``per_path``:
    parameters for the operations of one path only."""
    config = workdir / f"{name}.toml"
    lines = ["[parameters]", *(f'"{k}" = "{v}"' for k, v in (parameters or {}).items())]
    for path, values in (per_path or {}).items():
        lines += ["[[operations]]", f"include-path-regex = '{path}'", "[operations.parameters]",
                  *(f'"{k}" = "{v}"' for k, v in values.items())]
    config.write_text("\n".join(lines) + "\n")
    report = workdir / f"{name}.json"
    done = subprocess.run(
        [ST, "--config-file", str(config), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {token}",
         "--checks", "not_a_server_error", "--max-examples", str(examples), "--seed", SEED,
         # One worker: with several, hypothesis parses lambdas' source in threads, which trips a CPython 3.11
         # bug ("AST constructor recursion depth mismatch") inside schemathesis, not in the hub.
         "--workers", "1",
         "--request-timeout", "30", "--report", "json", "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=800, cwd=workdir,
    )
    assert report.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["complete"], done.stdout[-4000:]
    assert result["failures"] == [] and result["errors"] == [], done.stdout[-8000:]
    return result


async def every_stored_text(url: str) -> str:
    """Every row of every table, as text: what someone with a database dump could read."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            tables = (await conn.execute(text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ))).scalars().all()
            chunks = []
            for table in tables:
                rows = await conn.execute(text(f'SELECT t::text FROM "{table}" t'))
                chunks += [table, *rows.scalars().all()]
            return "\n".join(chunks)
    finally:
        await engine.dispose()


# Two schemathesis runs over every operation (jobs and pipelines included), each starting real containers:
# minutes on two cores, more under load.
@pytest.mark.timeout(900)
def test_fuzzed_api_never_answers_5xx_and_no_secret_is_kept_in_clear(
        deployment: LocalDeployment, db_url: str, tmp_path: Path) -> None:
    dep = deployment
    dep.plan_hubs(1)
    controller = dep.add_controller("fuzz")
    admin_token = dep.create_admin()
    dep.hub(0).start().wait_listening(30)
    # The controller beats with a key of its own: the fuzzer mints and revokes keys, which must
    # not be able to cut it off (a controller with its own key no longer beats with the shared one).
    controller_key = subprocess.run(
        [*MMANAGER, "controllers", "key-create", controller.name], env={**os.environ, **dep.hub_env},
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    controller.env["MMANAGER_CONTROLLER_KEY"] = controller_key
    controller.start().wait_listening()
    admin = api(dep.hub(0).url, admin_token)
    wait_until(lambda: admin.get(f"/api/admin/controllers/{controller.name}").json()["status"] == "healthy", 20,
               what="the controller healthy")
    created = admin.post("/api/admin/users", json={"username": "alice"})
    assert created.status_code == 201, created.text
    alice_token = created.json()["token"]
    alice = api(dep.hub(0).url, alice_token)
    service = alice.post("/api/alice/models/services", json={
        "name": "target", "image": EXAMPLE_IMAGE, "ports": {"5000": None},
        "resources": {"memory_limit": "32MB"}, "env": {"MODEL_PATH": "/models/x"},
    })
    assert service.status_code == 201, service.text
    service_id = service.json()["id"]

    # The admin's user and controller routes act on a user and a controller of their own (ids the fuzzer
    # learns from answers would otherwise have it delete, disable or re-address the real ones mid-run).
    assert admin.post("/api/admin/users", json={"username": "fuzzed"}).status_code == 201
    admin_targets = {r"^/api/admin/users/\{username\}": {"path.username": "fuzzed"},
                     r"^/api/admin/controllers/\{controller_id\}$": {"path.controller_id": "fuzzed"}}

    # As an admin, with generated ids; and as alice, aimed at her real service (and her own name),
    # so the service endpoints get past the 404 and into the lifecycle code.
    # follow=true streams a running service's logs until the client leaves: not a call that ends. Token ids are
    # one nobody has: a generated small id would revoke the fuzzer's own token and leave it 401s to send.
    # The two runs go at once, as two clients of the hub would: each waits on the hub between its requests,
    # so one at a time leaves a core idle.
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(fuzz, dep.hub(0).url, admin_token, tmp_path, "admin", examples=10,
                            parameters={"query.follow": "false", "path.token_id": "999999"},
                            per_path=admin_targets),
                pool.submit(fuzz, dep.hub(0).url, alice_token, tmp_path, "alice", examples=5,
                            parameters={"path.service_id": service_id, "path.username": "alice",
                                        "query.follow": "false", "path.token_id": "999999"})]
        first, second = (run.result() for run in runs)
    cases = first["test_cases"]["generated"] + second["test_cases"]["generated"]
    assert cases >= 1000, (first["test_cases"], second["test_cases"])
    assert first["operations"]["tested"] == first["operations"]["total"]

    # The hub is still whole afterwards, and the fuzzer's registrations (some at the real controller's
    # address) did not cut the controller off or take its containers.
    assert admin.get("/health").status_code == 200
    assert admin.get(f"/api/admin/controllers/{controller.name}").json()["status"] in ("healthy", "draining")

    secrets = {"admin token": admin_token, "alice's token": alice_token, "MMANAGER_API_KEY": dep.key,
               "controller key": controller_key}
    stored = asyncio.run(every_stored_text(db_url))
    logs = "\n".join(p.log.read_text(errors="replace") for p in [*dep.hubs, controller] if p.log.exists())
    for what, secret in secrets.items():
        assert secret not in stored, f"the {what} is stored in clear"
        assert secret not in logs, f"the {what} is in a log"
