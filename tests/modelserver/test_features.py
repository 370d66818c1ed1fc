"""Seed 001's features: the batch-vectorised torch path agrees with the per-record reference."""

from __future__ import annotations

import math
import random

import pytest

from modelserver import features


def random_dna(rng: random.Random, length: int) -> str:
    letters = "ACGTN" if rng.random() < 0.3 else "ACGT"
    if rng.random() < 0.2:  # long homopolymer runs and GC extremes too
        return "".join(rng.choice(letters) * rng.randint(1, 15) for _ in range(length))[:length]
    return "".join(rng.choice(letters) for _ in range(length))


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in features.FIELDS:
        assert got[name] == pytest.approx(want[name], abs=1e-9), name
    assert got["backend"] == "heuristic" and got["model_version"] == "heuristic-v1.0"


def test_vectorised_equals_reference() -> None:
    rng = random.Random(24)
    lengths = [0, 1, 2, 3, 4, 98, 99, 100, 197, 198, 199, 5120, 5119] + [rng.randint(0, 5120) for _ in range(40)]
    sequences = [random_dna(rng, n) for n in lengths] + ["N" * 300, "A" * 300, "ATG" * 50 + "TAA", "acgtn" * 20]
    for got, sequence in zip(features.extract(sequences), sequences, strict=True):
        assert_same(got, features.reference(sequence))


def test_runs_of_every_length_across_windows_and_sequences() -> None:
    """The run lengths are built by doubling, in 8 bits while they fit: runs about each power of two, runs
    across window boundaries, a run a whole sequence long, and runs that end where the next sequence starts."""
    sequences = ["A" * n for n in (1, 2, 3, 4, 7, 8, 9, 63, 64, 65, 127, 128, 129, 130, 255, 256, 257, 5120)]
    sequences += ["C" * 98 + "G" * 200 + "T", "ACGT" * 20 + "T" * 150 + "N" + "T" * 150, "G" * 99 + "g" * 99,
                  "N" * 99 + "A" * 129, "T" * 140, "T" * 140 + "A"]
    for got, sequence in zip(features.extract(sequences), sequences, strict=True):
        assert_same(got, features.reference(sequence))


def test_a_sequence_gives_the_same_features_alone_and_in_any_batch() -> None:
    rng = random.Random(5)
    sequences = [random_dna(rng, rng.randint(0, 900)) for _ in range(30)]
    for got, alone in zip(features.extract(sequences), (features.extract([s])[0] for s in sequences), strict=True):
        # Sums over a wider padded tensor may round differently in the last bits; the API's rounding hides it.
        assert got == pytest.approx(alone, abs=1e-12)
    assert features.extract([]) == []
    assert features.extract(["", ""]) == [features.reference("")] * 2


def test_known_values() -> None:
    empty = features.reference("")
    assert empty["avg_confidence"] == 0 and empty["perplexity"] == 1 and empty["codon_entropy"] == 0
    polya = features.reference("A" * 99)
    # GC 0 (score 0), entropy of one codon 0, a run of 99 (score 0).
    assert polya["avg_confidence"] == 0 and polya["longest_homopolymer"] == 99
    balanced = features.reference("ATGGCTGCAGCGGCC")
    assert balanced["gc_content"] == pytest.approx(11 / 15)
    assert balanced["codon_entropy"] == pytest.approx(math.log2(5))
    # CAI over GCT GCA GCG GCC (Met left out): w relative to GCG, E. coli's most used alanine codon.
    w = [features.CODON_USAGE[c] / features.CODON_USAGE["GCG"] for c in ("GCT", "GCA", "GCG", "GCC")]
    assert balanced["cai"] == pytest.approx(math.prod(w) ** 0.25)
    assert features.reference("AAAANAAAA")["longest_homopolymer"] == 4
