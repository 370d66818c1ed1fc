"""The tests' hubs keep their model and artifact stores out of the working tree: a deployment's hub processes in
its workdir (also when started outside pytest, as the benchmarks do), hub settings made in a test in the
session's temporary directory."""

from __future__ import annotations

from pathlib import Path

from hub.config import HubSettings
from tests.support.procs import LocalDeployment

REPO = Path(__file__).resolve().parents[2]


def test_a_deployments_hub_keeps_its_stores_in_its_workdir(tmp_path: Path) -> None:
    env = LocalDeployment("postgresql+asyncpg://unused/db", tmp_path / "mm").hub_env
    for name in ("MMANAGER_MODEL_STORE", "MMANAGER_ARTIFACT_STORE"):
        assert Path(env[name]).parent == tmp_path / "mm"


def test_hub_settings_made_in_a_test_keep_their_stores_outside_the_repository() -> None:
    settings = HubSettings(api_key="k" * 32, _env_file=None)
    for store in (settings.model_store, settings.artifact_store):
        assert not store.resolve().is_relative_to(REPO)
