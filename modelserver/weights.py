"""Makes each model type's deterministic weights, its ``model_config.json`` and its golden probe.

``python -m modelserver.weights --out DIR [--seed N] [--types dnabert2 lucaone evo2] [--catalog FILE]``
writes ``DIR/<type>/model.safetensors`` (not for evo2, which has no weights) and ``DIR/<type>/model_config.json``
(the model card of ``CARDS``, its architecture, and its probe: the answer these weights give to ``PROBES``'
fixed input). ``--catalog`` also writes the hub's catalog entries for the types made.

Invariant: the same seed gives byte-identical weights and the same probes on every machine (one
``torch.Generator``, parameters in sorted-name order); ``modelserver/catalog.json`` holds the probes of seed 0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import struct
from pathlib import Path
from typing import Any

import torch

from modelserver import features, nets
from modelserver.backends import Backend, load
from modelserver.config import CONFIG_FILE, MODEL_TYPES, WEIGHTS_FILE, ModelConfig, Probe
from modelserver.schemas import BatchRequest, PredictRequest, parse, to_items

IMAGE = "mmanager/modelserver:latest"
PORT = 8000
CATALOG = Path(__file__).with_name("catalog.json")
TOLERANCE = 1e-4

ARCHITECTURE: dict[str, dict[str, int]] = {
    "dnabert2": {"dim": 64, "patch": 4, "layers": 3, "kernel": 5},
    "lucaone": {"dim": 64, "patch": 4, "layers": 3, "kernel": 5, "embedding_dim": 768},
    "evo2": {},
}

CARDS: dict[str, dict[str, Any]] = {
    "dnabert2": {
        "name": "DNABERT2", "model_type": "dnabert2", "version": "1.0.0",
        "description": "DNA sequence analysis: promoter prediction (reference model, deterministic weights)",
        "tasks": ["promoter_prediction"],
        "input_format": {"type": "string", "description": "DNA sequence (ACGTN)",
                         "example": "ATGCGTACGTAGCTAGCTAGCTAGC"},
        "output_format": {"type": "float", "description": "probability of promoter activity", "range": [0, 1]},
        "supported_species": ["human", "mouse", "fruitfly"], "alphabet": "dna",
    },
    "lucaone": {
        "name": "LucaOne", "model_type": "lucaone", "version": "1.0.0",
        "description": "Nucleic acid and protein foundation model: embeddings, classification and property "
                       "prediction (reference model, deterministic weights)",
        "tasks": ["embedding", "classification", "property_prediction"],
        "input_format": {"type": "string", "description": "DNA (ACGTN) or protein (20 amino acids and X) sequence",
                         "example": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"},
        "output_format": {"type": "object", "description": "embedding vector, class or property values"},
        "supported_species": ["all"], "alphabet": "dna_protein",
    },
    "evo2": {
        "name": "Evo2", "model_type": "evo2", "version": "1.0.0",
        "description": "DNA sequence features for expression estimates (seed 001's heuristic backend)",
        "tasks": ["extract_features"],
        "input_format": {"type": "string", "description": "coding DNA sequence (ACGTN)",
                         "example": "ATGGCTAAAGGTGAAGAACTGTTCACCGGT"},
        "output_format": {"type": "object", "description": "confidence, likelihood and composition features"},
        # Elementwise feature maths gains little from intra-op threads and loses much on a shared CPU:
        # scale it with replicas instead.
        "supported_species": ["E_coli"], "alphabet": "dna", "threads": 1,
        # Its cost per batch is mostly per operation, not per record: a batch as large as a request may be
        # runs a /predict/batch request whole.
        "batching": {"enabled": True, "max_batch_size": 100, "max_wait_ms": 5.0},
    },
}

# Each type's probe: the path and the fixed body posted to it. Every letter of the model's alphabet (each
# nucleotide, N included, and each amino acid) and every part of the network counts in the answer: lucaone's
# embedding reaches the property and certainty heads through all of its dimensions, for a DNA and a protein
# sequence; evo2's two sequences of different lengths (one with N and a long run) are padded in one batch.
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "dnabert2": ("/predict", {
        "sequence": "TATAAAAGGCGCGCCGCGTATAAATAGGCGCCGGCCAATCACGCGTTATAAAGCGCGCTATAAAAGN",
        "task_type": "promoter_prediction"}),
    "lucaone": ("/predict/batch", {
        "sequences": ["ACGTNACGGTTAGCCATGCAAGTNNCGATCGGATCCTTAGGCAATG",
                      "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQACDEFGHIKLMNPQRSTVWYXW"],
        "task_type": "property_prediction"}),
    "evo2": ("/predict/batch", {
        "sequences": ["ATGGCTAAAGGTGAAGAACTGTTCACCGGTGTTGTTCCGATCCTGGTTGAACTGGATGGTGATGTTAACGGCCACAAATTC"
                      "AGCGTTAGCGGTGAAGGTGAAGGTGATGCGACCTACGGCAAACTGACCCTGAAATTCATCTGCACCACCTAA",
                      "ATGAAAAAAAAAAAAAACNGCGCGCGCTTTCGATTAGCCATGGCCGATCGATCCTTGGAAGGCCTTAACCGGTTAACGTACG"
                      "TTGCAGCTGATCGGGGGGGGATCCATGCATGCAAGCTTGGTACCTAA"],
        "task_type": "extract_features"}),
}
# What of each probe's answer is compared (of each answer's details, the keys listed).
PROBE_DETAILS: dict[str, tuple[str, ...]] = {
    "dnabert2": ("class", "probability"),
    "lucaone": ("molecule", "properties"),
    "evo2": features.FIELDS,
}
RESOURCES: dict[str, dict[str, Any]] = {
    "dnabert2": {"cpu_limit": 1.0, "memory_limit": "1g"},
    "lucaone": {"cpu_limit": 1.0, "memory_limit": "1g"},
    "evo2": {"cpu_limit": 1.0, "memory_limit": "1g"},
}


def make_state(model_type: str, seed: int) -> dict[str, torch.Tensor]:
    net = nets.build(model_type, ARCHITECTURE[model_type])
    nets.init_weights(net, seed)
    nets.calibrate(net, seed)
    return {name: tensor.detach().contiguous() for name, tensor in sorted(net.state_dict().items())}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The safetensors format written directly (an 8-byte header size, a JSON header, the raw little-endian
    data), so that making weights needs no numpy; ``safetensors.torch.load_file`` reads it."""
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for tensor in tensors.values():
            f.write(ctypes.string_at(tensor.data_ptr(), tensor.numel() * 4))


def probe_expect(model_type: str, backend: Backend, config: ModelConfig) -> dict[str, Any]:
    """What ``backend`` answers to ``model_type``'s probe, as the probe's ``expect``: the answers' predictions,
    confidences, lengths and ``PROBE_DETAILS``."""
    path, body = PROBES[model_type]
    batch = path == "/predict/batch"
    request = parse(BatchRequest, body) if batch else parse(PredictRequest, body)
    sequences = request.sequences if isinstance(request, BatchRequest) else [request.sequence]
    items = to_items(sequences, request.task_type, request.options, config, batch=batch)
    answers = []
    for sequence, answer in zip(sequences, backend.run(items), strict=True):
        data = {"prediction": answer["prediction"], "sequence_length": len(sequence),
                "details": {key: answer["details"][key] for key in PROBE_DETAILS[model_type]}}
        if answer["confidence"] is not None:
            data["confidence"] = answer["confidence"]
        answers.append(data)
    if batch:
        return {"success": True, "data": {"predictions": answers, "total_sequences": len(answers)}}
    return {"success": True, "data": answers[0]}


def probe_for(model_type: str, config: ModelConfig, directory: Path) -> Probe:
    """The golden probe of the weights in ``directory``: ``PROBES``' input and the answer they give on the CPU."""
    backend = load(config.model_copy(update={"device": "cpu"}), directory)
    path, body = PROBES[model_type]
    return Probe(path=path, body=body, expect=probe_expect(model_type, backend, config), tolerance=TOLERANCE)


def build_type(model_type: str, out: Path, seed: int = 0) -> ModelConfig:
    """Write ``out/<model_type>``'s weights and configuration (with its probe); return the configuration."""
    directory = out / model_type
    directory.mkdir(parents=True, exist_ok=True)
    card = dict(CARDS[model_type])
    card["architecture"] = ARCHITECTURE[model_type]
    if model_type == "evo2":
        card["weights"] = {"file": None, "seed": seed}
    else:
        write_safetensors(make_state(model_type, seed), directory / WEIGHTS_FILE)
        card["weights"] = {"file": WEIGHTS_FILE, "seed": seed, "dtype": "float32"}
    config = ModelConfig.model_validate(card)
    config = config.model_copy(update={"probe": probe_for(model_type, config, directory)})
    (directory / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    return config


def catalog_entry(config: ModelConfig) -> dict[str, Any]:
    """The hub's model-type entry for ``config`` (``POST /api/admin/models``'s body)."""
    assert config.probe is not None
    return {
        "name": config.model_type,
        "task": config.tasks[0],
        "description": config.description,
        "image": IMAGE,
        "resources": RESOURCES[config.model_type],
        "replicas": 1,
        "ports": {f"{PORT}/tcp": None},
        "health_check": {"path": "/health", "port": PORT},
        "environment": {"MODEL_TYPE": config.model_type},
        "probe": config.probe.model_dump(mode="json"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modelserver.weights", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write <type>/ into")
    parser.add_argument("--seed", type=int, default=0, help="the weights' seed (default 0)")
    parser.add_argument("--types", nargs="+", choices=MODEL_TYPES, default=list(MODEL_TYPES))
    parser.add_argument("--catalog", type=Path, help="also write the hub's catalog entries to this file")
    args = parser.parse_args(argv)
    configs = [build_type(model_type, args.out, args.seed) for model_type in args.types]
    for config in configs:
        print(f"{config.model_type}: {args.out / config.model_type}")
    if args.catalog:
        args.catalog.write_text(json.dumps([catalog_entry(c) for c in configs], indent=2) + "\n")


if __name__ == "__main__":
    main()
