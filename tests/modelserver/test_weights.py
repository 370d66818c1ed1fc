"""The weights builder: the same seed gives the same bytes and the probes of ``modelserver/catalog.json``; the
served model passes its own probe (by ``mmanager.golden``, the controller's rule) and a model with any one part
corrupted fails it; the environment overrides the configuration."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from hub.schemas import HealthCheckSpec, ProbeSpec, Resources
from mmanager.golden import mismatch
from modelserver import features
from modelserver.backends import load, sha256
from modelserver.config import MODEL_TYPES, ModelConfig, Settings, load_config
from modelserver.errors import ModelNotLoaded
from modelserver.sequences import DNA_TOKENS, PROTEIN_TOKENS, VOCAB_SIZE
from modelserver.weights import CATALOG, build_type, catalog_entry, main, probe_expect


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


def _tokens(tokens: dict[str, int], factor: float) -> Callable[[nn.Module], None]:
    """Multiply the embedding rows of ``tokens`` (at every patch offset) by ``factor``."""
    def corrupt(net: nn.Module) -> None:
        weight = net.get_parameter("encoder.embed.weight")
        rows = [row for row in range(weight.shape[0]) if row % VOCAB_SIZE in set(tokens.values())]
        weight[rows] *= factor
    return corrupt


def _scale(factor: float, *names: str, rows: slice = slice(None)) -> Callable[[nn.Module], None]:
    """Multiply the parameters ``names`` (their ``rows``) by ``factor``."""
    def corrupt(net: nn.Module) -> None:
        for name in names:
            net.get_parameter(name)[rows] *= factor
    return corrupt


CORRUPTIONS: list[tuple[str, str, Callable[[nn.Module], None]]] = [
    ("dnabert2", "the head", _scale(-5, "head.weight")),
    ("dnabert2", "the head's bias", _scale(3, "head.bias")),
    ("dnabert2", "every DNA token embedding", _tokens(DNA_TOKENS, -3)),
    ("dnabert2", "the N embedding", _tokens({"N": DNA_TOKENS["N"]}, -3)),
    ("dnabert2", "one conv layer", _scale(-5, "encoder.convs.1.weight")),
    ("lucaone", "the classify and property heads", _scale(-5, "classify.weight", "properties.weight")),
    ("lucaone", "the property head", _scale(-5, "properties.weight")),
    ("lucaone", "the certainty head", _scale(-5, "certainty.weight")),
    ("lucaone", "embedding dimensions 8-767", _scale(-5, "project.weight", rows=slice(8, None))),
    ("lucaone", "every DNA token embedding", _tokens(DNA_TOKENS, -3)),
    ("lucaone", "every protein token embedding", _tokens(PROTEIN_TOKENS, -3)),
    ("lucaone", "one conv layer", _scale(-5, "encoder.convs.1.weight")),
]


@pytest.mark.parametrize(("model_type", "part", "corrupt"), CORRUPTIONS, ids=[f"{t}: {p}" for t, p, _ in CORRUPTIONS])
def test_a_model_with_one_part_corrupted_fails_its_probe(model_dir: Path, model_type: str, part: str,
                                                         corrupt: Callable[[nn.Module], None]) -> None:
    probe = catalog()[model_type]["probe"]
    config = ModelConfig.model_validate_json((model_dir / model_type / "model_config.json").read_text())
    backend = load(config.model_copy(update={"device": "cpu"}), model_dir / model_type)
    assert mismatch(probe_expect(model_type, backend, config), probe["expect"], probe["tolerance"]) is None
    with torch.no_grad():
        corrupt(backend.net)  # type: ignore[attr-defined]
    assert mismatch(probe_expect(model_type, backend, config), probe["expect"], probe["tolerance"]) is not None, part


def test_the_evo2_probe_checks_every_feature_of_a_padded_batch() -> None:
    probe = catalog()["evo2"]["probe"]
    assert probe["path"] == "/predict/batch"
    sequences = probe["body"]["sequences"]
    assert len({len(s) for s in sequences}) == len(sequences) > 1 and any("N" in s for s in sequences)
    for answer in probe["expect"]["data"]["predictions"]:
        assert set(answer["details"]) == set(features.FIELDS)
