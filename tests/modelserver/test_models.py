"""Each model type's tasks and alphabet over HTTP, and that a sequence's result is the same alone and in a
padded batch (the networks mask their padding)."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
import torch

from modelserver import features
from modelserver.backends import Item, LucaOneBackend, PromoterBackend, load
from modelserver.config import Settings, load_config
from tests.modelserver.test_api import envelope, refused

PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
CDS = "ATGGCTAAAGGTGAAGAACTGTTCACCGGTGTTGTTCCGATCCTGGTTGAACTGGATGGTGATGTTAACGGCCACAAATTCTAA"


def test_lucaone_embeddings(lucaone: str) -> None:
    full = envelope(httpx.post(f"{lucaone}/predict", json={"sequence": PROTEIN, "task_type": "embedding"}))
    assert len(full["prediction"]) == 768 and full["details"] == {"embedding_dimension": 768, "molecule": "protein"}
    small = envelope(httpx.post(f"{lucaone}/predict", json={"sequence": PROTEIN, "task_type": "embedding",
                                                             "options": {"embedding_dimension": 16}}))
    assert small["prediction"] == full["prediction"][:16]
    dna = envelope(httpx.post(f"{lucaone}/predict", json={"sequence": CDS, "task_type": "embedding"}))
    assert dna["details"]["molecule"] == "dna" and dna["prediction"] != full["prediction"]
    refused(httpx.post(f"{lucaone}/predict", json={"sequence": PROTEIN, "task_type": "embedding",
                                                    "options": {"embedding_dimension": 769}}), 400, "INVALID_REQUEST")
    refused(httpx.post(f"{lucaone}/predict", json={"sequence": PROTEIN, "options": {"embedding_dimension": 0}}),
            400, "INVALID_REQUEST")


def test_lucaone_classification_and_properties(lucaone: str) -> None:
    data = envelope(httpx.post(f"{lucaone}/predict", json={"sequence": PROTEIN, "task_type": "classification"}))
    probabilities = data["details"]["probabilities"]
    assert data["prediction"] == data["details"]["class"] == max(probabilities, key=probabilities.get)
    assert data["confidence"] == probabilities[data["prediction"]]
    assert abs(sum(probabilities.values()) - 1) < 1e-5
    data = envelope(httpx.post(f"{lucaone}/predict", json={"sequence": CDS, "task_type": "property_prediction"}))
    assert set(data["details"]["properties"]) == {"stability", "solubility", "expression"}
    assert data["prediction"] == data["details"]["properties"]["stability"] and 0 < data["confidence"] < 1
    batch = envelope(httpx.post(f"{lucaone}/predict/batch", json={"sequences": [PROTEIN, CDS.lower()],
                                                                 "task_type": "classification"}))
    assert [p["details"]["molecule"] for p in batch["predictions"]] == ["protein", "dna"]


@pytest.mark.parametrize("letter", ["B", "J", "O", "U", "Z", "*", "-", "1", "ı", "é"])
def test_lucaone_alphabet(lucaone: str, letter: str) -> None:
    details = refused(httpx.post(f"{lucaone}/predict", json={"sequence": "MKT" + letter + "A"}), 400,
                      "INVALID_SEQUENCE")
    assert f"{letter!r} at position 3" in details


def test_evo2_features(evo2: str) -> None:
    data = envelope(httpx.post(f"{evo2}/predict", json={"sequence": CDS.lower(), "task_type": "extract_features"}))
    expected = features.reference(CDS)
    assert data["prediction"] == data["confidence"] == data["details"]["avg_confidence"]
    assert data["sequence_length"] == len(CDS)
    for name in features.FIELDS:
        assert data["details"][name] == pytest.approx(expected[name], abs=1e-6), name
    assert data["details"]["backend"] == "heuristic" and data["details"]["model_version"] == "heuristic-v1.0"
    assert "codon_usage" not in data["details"]
    usage = envelope(httpx.post(f"{evo2}/predict", json={"sequence": CDS, "options": {"return_codon_usage": True}}))
    assert usage["details"]["codon_usage"]["ATG"] == 1 and sum(usage["details"]["codon_usage"].values()) == 28
    refused(httpx.post(f"{evo2}/predict", json={"sequence": PROTEIN}), 400, "INVALID_SEQUENCE")
    refused(httpx.post(f"{evo2}/predict", json={"sequence": CDS, "task_type": "embedding"}), 400, "INVALID_REQUEST")


def random_sequence(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


@pytest.mark.parametrize("model_type", ["dnabert2", "lucaone"])
def test_a_sequence_gives_the_same_numbers_alone_and_in_a_padded_batch(model_dir: Path, model_type: str) -> None:
    config = load_config(Settings(model_dir=model_dir, model_type=model_type, model_device="cpu"))
    backend = load(config, model_dir / model_type)
    rng = random.Random(7)
    alphabets = ["ACGTN", "ACDEFGHIKLMNPQRSTVWYX"] if model_type == "lucaone" else ["ACGTN"]
    sequences = [random_sequence(rng, alphabets[i % len(alphabets)], rng.randint(1, 700)) for i in range(12)]
    sequences.append(random_sequence(rng, "ACGT", 2000))
    with torch.inference_mode():
        if isinstance(backend, PromoterBackend):
            from modelserver.sequences import encode

            def raw(seqs: list[str]) -> torch.Tensor:
                return backend.net(encode(seqs, pad_to=4))
        else:
            assert isinstance(backend, LucaOneBackend)
            from modelserver.sequences import encode, is_dna

            def raw(seqs: list[str]) -> torch.Tensor:
                result = backend.net(encode(seqs, [not is_dna(s) for s in seqs], pad_to=4))
                return torch.cat([result["embedding"], result["class_probabilities"], result["properties"]], dim=1)

        together = raw(sequences)
        for i, seq in enumerate(sequences):
            assert torch.allclose(raw([seq])[0], together[i], rtol=0, atol=1e-12)
    # And through the backend's rounding: equal for these sequences (a value on a rounding boundary could
    # differ in its last digit).
    task = config.tasks[0]
    batched = backend.run([Item(s, task) for s in sequences])
    assert batched == [backend.run([Item(s, task)])[0] for s in sequences]
