"""The request bodies of ``/predict`` and ``/predict/batch``, and how one becomes the model's items.

Bodies are parsed strictly (no type coercion, unknown fields refused) and every refusal is a ``ServiceError``
with seed 000's code, never FastAPI's 422. ``to_items`` is the only way a sequence reaches the model.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelserver.backends import Item
from modelserver.config import ModelConfig
from modelserver.errors import InvalidRequest
from modelserver.sequences import check


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Options(_Strict):
    return_confidence: bool = True
    # Accepted for seed 000's clients; the server batches by itself (MODEL_MAX_BATCH_SIZE).
    batch_size: int = Field(1, ge=1)
    # lucaone's embedding task: the first this many of the embedding's values.
    embedding_dimension: int | None = Field(None, ge=1)
    # evo2: add the in-frame codon counts to the details.
    return_codon_usage: bool = False


class PredictRequest(_Strict):
    sequence: str
    task_type: str | None = None
    options: Options = Field(default_factory=Options)


class BatchRequest(_Strict):
    sequences: list[str]
    task_type: str | None = None
    options: Options = Field(default_factory=Options)


T = TypeVar("T", bound=BaseModel)

# A refusal names at most this many problems: a body can hold many more than a client needs to read.
MAX_PROBLEMS = 10


def parse(model: type[T], body: Any) -> T:
    """``body`` (decoded JSON) as ``model``, or ``InvalidRequest`` naming each problem."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:MAX_PROBLEMS])
        if len(errors) > MAX_PROBLEMS:
            problems += f"; and {len(errors) - MAX_PROBLEMS} more problems"
        raise InvalidRequest(problems) from None


def check_batch_length(body: Any, limit: int) -> None:
    """Refuse a ``/predict/batch`` body of more than ``limit`` sequences before any of them is validated."""
    sequences = body.get("sequences") if isinstance(body, dict) else None
    if isinstance(sequences, list) and len(sequences) > limit:
        raise InvalidRequest(f"{len(sequences)} sequences; at most {limit} a batch")


def to_items(sequences: list[str], task_type: str | None, options: Options, config: ModelConfig,
             batch: bool = False) -> list[Item]:
    """The checked items of a request: task known to the model, sequences within the limits and alphabet."""
    task = task_type if task_type is not None else config.tasks[0]
    if task not in config.tasks:
        raise InvalidRequest(f"unknown task_type {task!r}; {config.name} does: {', '.join(config.tasks)}")
    if batch:
        if not sequences:
            raise InvalidRequest("sequences is empty")
        if len(sequences) > config.limits.max_batch_sequences:
            raise InvalidRequest(f"{len(sequences)} sequences; at most {config.limits.max_batch_sequences} a batch")
    dimension = int(config.architecture.get("embedding_dim", 768))
    if options.embedding_dimension is not None and options.embedding_dimension > dimension:
        raise InvalidRequest(f"embedding_dimension {options.embedding_dimension} is more than the model's {dimension}")
    protein = config.alphabet == "dna_protein"
    limit = config.limits.max_sequence_chars
    return [Item(check(seq, limit, protein, f"sequences[{i}]" if batch else "sequence"), task,
                 options.return_confidence, options.embedding_dimension, options.return_codon_usage)
            for i, seq in enumerate(sequences)]
