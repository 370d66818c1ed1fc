"""Shared fixtures: a throwaway PostgreSQL cluster, databases migrated to
head, and the example image built on the real Docker engine; and the
markers: a test that uses the PostgreSQL fixtures is ``postgres``, one that
uses Docker's is ``docker``, so ``-m "not docker and not postgres"`` runs
without either."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import docker
import pytest
from sqlalchemy import text

from examples.images import EXAMPLE_IMAGE, build_example_image, build_modelserver_image
from hub.db import Database
from hub.migrate import upgrade
from hub.models import Base
from tests.support.pg import create_database, throwaway_cluster


@pytest.fixture(scope="session", autouse=True)
def _model_store_outside_the_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hub settings made without a model store (or artifact store) of their own keep uploads in a temporary
    directory, never in the working tree (the defaults ``./model-store``, ``./artifact-store``)."""
    names = ("MMANAGER_MODEL_STORE", "MMANAGER_ARTIFACT_STORE")
    before = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with throwaway_cluster() as url:
        yield url


@pytest.fixture(scope="session")
async def pg_url(pg_server: str) -> str:
    """A database migrated to head once per session; tests clean its rows."""
    url = await create_database(pg_server, "api")
    await asyncio.to_thread(upgrade, url)
    return url


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    database = await emptied(Database(pg_url))
    yield database
    await database.dispose()


async def emptied(database: Database) -> Database:
    """``database`` (PostgreSQL) with every table emptied."""
    async with database.session() as session:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        # audit_log refuses TRUNCATE (a trigger); the replica role, for this transaction only (SET LOCAL,
        # the test cluster's user is a superuser), fires no triggers.
        await session.execute(text("SET LOCAL session_replication_role = replica"))
        await session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return database


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    client.ping()
    yield client
    client.close()


@pytest.fixture(scope="session")
def example_image(docker_client: docker.DockerClient) -> str:
    return build_example_image(docker_client, EXAMPLE_IMAGE)


@pytest.fixture(scope="session")
def modelserver_image(docker_client: docker.DockerClient) -> str:
    """The reference model service's image (built once, then only when its sources change)."""
    return build_modelserver_image()


# The fixtures that reach each outside system; a test that starts one itself carries the mark explicitly.
POSTGRES_FIXTURES = frozenset({"pg_server"})
DOCKER_FIXTURES = frozenset({"docker_client"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)
        if used & DOCKER_FIXTURES:
            item.add_marker(pytest.mark.docker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can print logs for failed tests."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
