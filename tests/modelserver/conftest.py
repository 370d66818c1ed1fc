"""Weights built once per session into a temporary directory, and the model service served from them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from modelserver.config import Settings
from modelserver.weights import build_type
from tests.support.modelserver import served_model, wait_loaded


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    for model_type in ("dnabert2", "lucaone", "evo2"):
        build_type(model_type, out, seed=0)
    return out


@contextmanager
def serve(model_dir: Path, model_type: str, **overrides: object) -> Iterator[str]:
    """The URL of ``model_type`` served from ``model_dir`` on the CPU, loaded (``overrides``: more settings)."""
    settings = Settings(model_dir=model_dir, model_type=model_type, model_device="cpu", **overrides)  # type: ignore[arg-type]
    with served_model(settings) as url:
        wait_loaded(url)
        yield url


@pytest.fixture(scope="session")
def dnabert2(model_dir: Path) -> Iterator[str]:
    with serve(model_dir, "dnabert2") as url:
        yield url


@pytest.fixture(scope="session")
def lucaone(model_dir: Path) -> Iterator[str]:
    with serve(model_dir, "lucaone") as url:
        yield url


@pytest.fixture(scope="session")
def evo2(model_dir: Path) -> Iterator[str]:
    with serve(model_dir, "evo2") as url:
        yield url
