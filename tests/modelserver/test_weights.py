"""The weights builder: the same seed gives the same bytes and the probes of ``modelserver/catalog.json``; the
served model passes its own probe (by ``mmanager.golden``, the controller's rule); the environment overrides
the configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.schemas import HealthCheckSpec, ProbeSpec, Resources
from mmanager.golden import mismatch
from modelserver.backends import sha256
from modelserver.config import MODEL_TYPES, ModelConfig, Settings, load_config
from modelserver.errors import ModelNotLoaded
from modelserver.weights import CATALOG, build_type, catalog_entry, main


def catalog() -> dict[str, Any]:
    return {entry["name"]: entry for entry in json.loads(CATALOG.read_text())}


def test_regenerated_weights_give_the_catalog_probes(model_dir: Path) -> None:
    """A torch upgrade (or a change of the models) that changes what seed 0 computes fails here: rebuild
    with ``python -m modelserver.weights --out DIR --catalog modelserver/catalog.json`` on purpose."""
    entries = catalog()
    assert sorted(entries) == sorted(MODEL_TYPES)
    for model_type in MODEL_TYPES:
        config = ModelConfig.model_validate_json((model_dir / model_type / "model_config.json").read_text())
        assert config.probe is not None
        assert catalog_entry(config) == entries[model_type], model_type


def test_the_same_seed_gives_the_same_bytes(tmp_path: Path, model_dir: Path) -> None:
    other = build_type("dnabert2", tmp_path / "again", seed=0)
    path = "dnabert2/model.safetensors"
    assert sha256(tmp_path / "again" / path) == sha256(model_dir / path)
    assert other.probe is not None and other.probe.model_dump(mode="json") == catalog()["dnabert2"]["probe"]
    changed = build_type("dnabert2", tmp_path / "seed1", seed=1)
    assert changed.probe is not None
    assert mismatch(changed.probe.expect, other.probe.expect, other.probe.tolerance) is not None


def test_catalog_entries_make_hub_specs() -> None:
    for name, entry in catalog().items():
        Resources.model_validate(entry["resources"])
        ProbeSpec.model_validate(entry["probe"])
        assert HealthCheckSpec.model_validate(entry["health_check"]).path == "/health"
        assert entry["image"] == "mmanager/modelserver:latest" and entry["environment"] == {"MODEL_TYPE": name}
        assert entry["ports"] == {"8000/tcp": None} and entry["replicas"] == 1


def test_each_served_model_passes_its_own_probe(dnabert2: str, lucaone: str, evo2: str) -> None:
    entries = catalog()
    for model_type, url in (("dnabert2", dnabert2), ("lucaone", lucaone), ("evo2", evo2)):
        probe = entries[model_type]["probe"]
        answer = httpx.post(url + probe["path"], json=probe["body"]).json()
        assert mismatch(answer, probe["expect"], probe["tolerance"]) is None, (model_type, answer)
        assert httpx.get(f"{url}/model/info").json()["data"]["probe"] == probe


def test_the_command_line(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--types", "evo2", "--catalog", str(tmp_path / "catalog.json")])
    assert (tmp_path / "evo2" / "model_config.json").exists()
    assert [e["name"] for e in json.loads((tmp_path / "catalog.json").read_text())] == ["evo2"]


def test_environment_overrides_the_file(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"MODEL_TYPE": "lucaone", "MODEL_DIR": str(model_dir), "MODEL_DEVICE": "cpu",
                        "MODEL_BATCHING": "0", "MODEL_MAX_BATCH_SIZE": "7", "MODEL_MAX_WAIT_MS": "2.5",
                        "MODEL_THREADS": "1", "PORT": "9001", "HOST": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.port, settings.host) == (9001, "127.0.0.1")
    config = load_config(settings)
    assert config.name == "LucaOne" and config.device == "cpu" and config.threads == 1
    assert config.batching.model_dump() == {"enabled": False, "max_batch_size": 7, "max_wait_ms": 2.5}
    for name in ("MODEL_BATCHING", "MODEL_MAX_BATCH_SIZE", "MODEL_MAX_WAIT_MS", "MODEL_DEVICE", "MODEL_THREADS"):
        monkeypatch.delenv(name)
    config = load_config(Settings())
    assert config.batching.model_dump() == {"enabled": True, "max_batch_size": 32, "max_wait_ms": 5.0}
    assert config.device == "auto" and config.threads is None
    monkeypatch.setenv("MODEL_TYPE", "nothing")
    with pytest.raises(ModelNotLoaded):
        load_config(Settings())
