"""What one model service runs with: the model card and settings of ``$MODEL_DIR/<type>/model_config.json``
(seed 000's ``model_config.json`` shape), overridden by environment variables.

Environment (every one optional):

- ``MODEL_TYPE``: which model this process serves, ``dnabert2`` | ``lucaone`` | ``evo2`` (default ``dnabert2``).
- ``MODEL_DIR``: where the weights builder wrote ``<type>/model_config.json`` and ``<type>/model.safetensors``
  (default ``/opt/modelserver/models``).
- ``MODEL_DEVICE``: ``auto`` (CUDA when torch sees a GPU, else the CPU) | ``cpu`` | ``cuda``.
- ``MODEL_BATCHING``: ``1``/``0``: dynamic batching of concurrent requests on or off.
- ``MODEL_MAX_BATCH_SIZE``: the most sequences one forward pass takes (default 32).
- ``MODEL_MAX_WAIT_MS``: how long the first waiting request waits for company (default 5).
- ``MODEL_THREADS``: torch's intra-op threads (default: torch's own choice).
- ``MODEL_MAX_BODY_BYTES``: the largest request body read (default 1 MiB: a full batch of 100 x 5,120
  characters with room for the JSON around it); a larger one is refused with 413 ``INVALID_REQUEST``.
- ``HOST``, ``PORT``: where ``python -m modelserver`` listens (default ``0.0.0.0:8000``).

Invariant: an environment variable that is set wins over the file; one that is unset leaves the file's value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelserver.errors import ModelNotLoaded

MODEL_TYPES = ("dnabert2", "lucaone", "evo2")
CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"

Device = Literal["auto", "cpu", "cuda"]


class Batching(BaseModel):
    enabled: bool = True
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)


class Limits(BaseModel):
    max_batch_sequences: int = Field(100, ge=1)
    max_sequence_chars: int = Field(5120, ge=1)


class Probe(BaseModel):
    """A golden-inference probe: POST ``body`` to ``path``; the answer must contain ``expect`` (numbers within
    ``tolerance``)."""

    path: str
    body: dict[str, Any]
    expect: dict[str, Any]
    tolerance: float = Field(1e-4, ge=0)


class WeightsInfo(BaseModel):
    file: str | None = WEIGHTS_FILE
    seed: int = 0
    dtype: str = "float32"


class ModelConfig(BaseModel):
    """The file ``model_config.json``: seed 000's model card plus how to run it."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    name: str
    model_type: str
    version: str = "1.0.0"
    description: str = ""
    tasks: list[str]
    input_format: dict[str, Any] = Field(default_factory=dict)
    output_format: dict[str, Any] = Field(default_factory=dict)
    max_sequence_length: int = 5120
    supported_species: list[str] = Field(default_factory=list)
    # Which letters a sequence may hold: DNA (ACGTN), or DNA and protein (20 amino acids and X).
    alphabet: Literal["dna", "dna_protein"] = "dna"
    device: Device = "auto"
    batching: Batching = Field(default_factory=Batching)
    limits: Limits = Field(default_factory=Limits)
    threads: int | None = Field(None, ge=1)
    architecture: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsInfo = Field(default_factory=WeightsInfo)
    probe: Probe | None = None


class Settings(BaseSettings):
    """The process's environment (names as above, case-insensitive)."""

    model_config = SettingsConfigDict(protected_namespaces=("settings_",), extra="ignore")

    model_type: str = "dnabert2"
    model_dir: Path = Path("/opt/modelserver/models")
    model_device: Device | None = None
    model_batching: bool | None = None
    model_max_batch_size: int | None = Field(None, ge=1, le=1024)
    model_max_wait_ms: float | None = Field(None, ge=0, le=10_000)
    model_threads: int | None = Field(None, ge=1)
    model_max_body_bytes: int = Field(1 << 20, ge=1024)
    host: str = "0.0.0.0"
    port: int = 8000

    @property
    def type_dir(self) -> Path:
        return self.model_dir / self.model_type


def load_config(settings: Settings) -> ModelConfig:
    """The model's effective configuration: its file with the environment's overrides applied.

    Raises ``ModelNotLoaded`` when there is no readable, valid file for ``settings.model_type``."""
    path = settings.type_dir / CONFIG_FILE
    try:
        config = ModelConfig.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ModelNotLoaded(f"no model configuration at {path} (MODEL_TYPE={settings.model_type!r})") from exc
    except (OSError, ValueError, ValidationError) as exc:
        raise ModelNotLoaded(f"unreadable model configuration {path}: {exc}") from exc
    batching = config.batching.model_copy(update={
        key: value for key, value in (("enabled", settings.model_batching),
                                      ("max_batch_size", settings.model_max_batch_size),
                                      ("max_wait_ms", settings.model_max_wait_ms)) if value is not None})
    update: dict[str, Any] = {"batching": batching}
    if settings.model_device is not None:
        update["device"] = settings.model_device
    if settings.model_threads is not None:
        update["threads"] = settings.model_threads
    return config.model_copy(update=update)
