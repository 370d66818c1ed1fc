"""The model one process serves, loaded onto its device, answering a list of checked items at once.

``load(config, directory)`` picks the device (CUDA when torch sees one, unless the config says otherwise),
reads the safetensors weights and warms the model up. ``Backend.run(items)`` is one forward pass over all of
the items, whatever their tasks and options, and returns each item's ``{prediction, confidence, details}``
with floats rounded to ``DIGITS`` decimals. Invariant: an item's answer depends on the item alone, up to
floating-point rounding: the networks mask their padding and run in float64, but a batch's kernels may group
sums differently, so raw outputs agree to about 1e-15 and a rounded last digit can, rarely, differ.
"""

from __future__ import annotations

import hashlib
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from modelserver import features, nets
from modelserver.config import ModelConfig
from modelserver.errors import ModelNotLoaded
from modelserver.sequences import encode, is_dna

DIGITS = 6


def _round(value: float) -> float:
    return round(value, DIGITS)


@dataclass(frozen=True)
class Item:
    """One sequence to answer: checked and upper-cased, with its task and options."""

    sequence: str
    task: str
    return_confidence: bool = True
    embedding_dimension: int | None = None
    return_codon_usage: bool = False


class Backend(ABC):
    def __init__(self, device: torch.device, weights_sha256: str | None) -> None:
        self.device = device
        self.weights_sha256 = weights_sha256

    @abstractmethod
    def answers(self, items: list[Item]) -> list[tuple[Any, float | None, dict[str, Any]]]:
        """(prediction, confidence, details) of each item, in order."""

    def run(self, items: list[Item]) -> list[dict[str, Any]]:
        with torch.inference_mode():
            answers = self.answers(items)
        return [{"prediction": prediction, "confidence": confidence if item.return_confidence else None,
                 "details": details} for item, (prediction, confidence, details) in zip(items, answers, strict=True)]


class PromoterBackend(Backend):
    """dnabert2: ``promoter_prediction``; the prediction is the promoter probability, the confidence that of
    the class chosen."""

    def __init__(self, net: nets.PromoterNet, device: torch.device, weights_sha256: str | None) -> None:
        super().__init__(device, weights_sha256)
        self.net = net

    def answers(self, items: list[Item]) -> list[tuple[Any, float | None, dict[str, Any]]]:
        tokens = encode([item.sequence for item in items], pad_to=self.net.encoder.patch).to(self.device)
        probabilities = self.net(tokens).tolist()
        out: list[tuple[Any, float | None, dict[str, Any]]] = []
        for p in probabilities:
            promoter = p >= 0.5
            out.append((_round(p), _round(p if promoter else 1 - p),
                        {"class": nets.PROMOTER_CLASSES[promoter], "probability": _round(p)}))
        return out


class LucaOneBackend(Backend):
    """lucaone: ``embedding`` (the first ``embedding_dimension`` values), ``classification`` and
    ``property_prediction``, for DNA and protein sequences alike (a sequence of ``ACGTN`` only is DNA)."""

    def __init__(self, net: nets.LucaOneNet, device: torch.device, weights_sha256: str | None) -> None:
        super().__init__(device, weights_sha256)
        self.net = net

    def answers(self, items: list[Item]) -> list[tuple[Any, float | None, dict[str, Any]]]:
        sequences = [item.sequence for item in items]
        protein = [not is_dna(s) for s in sequences]
        tokens = encode(sequences, protein, pad_to=self.net.encoder.patch).to(self.device)
        result = self.net(tokens)
        tasks = {item.task for item in items}
        embedding = result["embedding"].tolist() if "embedding" in tasks else None
        classes = result["class_probabilities"].tolist() if "classification" in tasks else None
        properties = result["properties"].tolist() if "property_prediction" in tasks else None
        certainty = result["property_confidence"].tolist() if "property_prediction" in tasks else None
        out: list[tuple[Any, float | None, dict[str, Any]]] = []
        for i, item in enumerate(items):
            molecule = "protein" if protein[i] else "dna"
            if item.task == "embedding":
                assert embedding is not None
                vector = [_round(v) for v in embedding[i][: item.embedding_dimension or len(embedding[i])]]
                out.append((vector, None, {"embedding_dimension": len(vector), "molecule": molecule}))
            elif item.task == "classification":
                assert classes is not None
                probs = classes[i]
                best = max(range(len(probs)), key=probs.__getitem__)
                out.append((nets.LUCAONE_CLASSES[best], _round(probs[best]), {
                    "class": nets.LUCAONE_CLASSES[best], "molecule": molecule,
                    "probabilities": {label: _round(p) for label, p in zip(nets.LUCAONE_CLASSES, probs, strict=True)}}))
            else:
                assert properties is not None and certainty is not None
                values = {name: _round(v) for name, v in zip(nets.LUCAONE_PROPERTIES, properties[i], strict=True)}
                out.append((values[nets.LUCAONE_PROPERTIES[0]], _round(certainty[i]),
                            {"properties": values, "molecule": molecule}))
        return out


class FeatureBackend(Backend):
    """evo2: ``extract_features``, seed 001's heuristic features; the prediction and the confidence are the
    average window confidence, the details every feature."""

    def answers(self, items: list[Item]) -> list[tuple[Any, float | None, dict[str, Any]]]:
        columns = features.extract_tensors(features.encode([item.sequence for item in items], self.device))
        # Column by column: one list per feature, floats rounded in one comprehension each.
        values = [[round(v, DIGITS) for v in column.tolist()] if column.is_floating_point() else column.tolist()
                  for column in (columns[name] for name in features.FIELDS)]
        counts = columns["codon_counts"].tolist() if any(item.return_codon_usage for item in items) else None
        out: list[tuple[Any, float | None, dict[str, Any]]] = []
        for i, (item, row) in enumerate(zip(items, zip(*values, strict=True), strict=True)):
            details: dict[str, Any] = dict(zip(features.FIELDS, row, strict=True), backend=features.BACKEND,
                                           model_version=features.MODEL_VERSION)
            if counts is not None and item.return_codon_usage:
                details["codon_usage"] = {codon: int(n) for codon, n in zip(features.CODONS, counts[i], strict=True)
                                          if n}
            out.append((details["avg_confidence"], details["avg_confidence"], details))
        return out


def pick_device(wanted: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU. Asking for CUDA without one is a load failure."""
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ModelNotLoaded("MODEL_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(wanted)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_limit() -> int | None:
    """The CPUs this process may use: its affinity and its cgroup's CPU quota (a container's ``--cpus``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
        except OSError:
            continue
        if len(fields) >= 2 and fields[0] not in ("max", "-1"):
            quota = max(1, math.ceil(int(fields[0]) / int(fields[1])))
            cpus = min(cpus, quota) if cpus else quota
        break
    return cpus


def load(config: ModelConfig, directory: Path) -> Backend:
    """The model of ``config`` from ``directory`` on its device, warmed up; ``ModelNotLoaded`` if it cannot be.

    torch's threads: ``config.threads``, else no more than the CPUs the process may use (torch counts the
    machine's cores, and more threads than a container's quota get throttled)."""
    limit = config.threads or cpu_limit()
    if limit and (config.threads or limit < torch.get_num_threads()):
        torch.set_num_threads(limit)
    device = pick_device(config.device)
    backend: Backend
    if config.model_type == "evo2":
        backend = FeatureBackend(device, None)
    elif config.model_type in ("dnabert2", "lucaone"):
        path = directory / (config.weights.file or "")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a malformed file
            raise ModelNotLoaded(f"cannot read the weights {path}: {exc}") from exc
        net = nets.build(config.model_type, config.architecture)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelNotLoaded(f"the weights {path} do not fit the architecture: {exc}") from exc
        net = net.to(dtype=torch.float64, device=device).eval()
        if isinstance(net, nets.PromoterNet):
            backend = PromoterBackend(net, device, sha256(path))
        else:
            assert isinstance(net, nets.LucaOneNet)
            backend = LucaOneBackend(net, device, sha256(path))
    else:
        raise ModelNotLoaded(f"unknown model type {config.model_type!r}")
    backend.run([Item("ACGT", config.tasks[0])])
    return backend
