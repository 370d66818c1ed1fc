"""Seed 001's Evo2 heuristic feature backend, vectorised in torch over a whole batch.

``extract(sequences)`` encodes a batch once into a padded tensor and computes every feature for all sequences
together; ``reference(sequence)`` is the same maths one record at a time in plain Python (what the tests
compare against and what the benchmark runs as its baseline). Invariant: for any sequence of ``ACGTN``,
``extract`` and ``reference`` agree within 1e-6, and a sequence's features do not depend on its batch.

The maths (sequence upper-cased, n letters):

- gc_content: (G + C) / (A + C + G + T); N is not counted. 0 when there is no base.
- codon usage: the n // 3 in-frame codons from position 0; a codon with an N is skipped.
- codon_entropy: Shannon entropy (bits) of the codon frequencies.
- longest_homopolymer: the longest run of one base (N breaks a run).
- cai: a CAI-like score, the geometric mean of each codon's relative adaptiveness w (its usage over its
  amino acid's most used codon) in ``CODON_USAGE``, Met, Trp and stop codons left out; 0 without codons.
- avg_loglik: mean log-likelihood per nucleotide of the codons under ``CODON_USAGE`` (ln p(codon) / 3);
  perplexity = exp(-avg_loglik). 0 and 1 without codons.
- confidence: per window of ``WINDOW`` nucleotides (consecutive tiles, the last one shorter), the seed's
  weighted score ``GC_WEIGHT * gc_score + ENTROPY_WEIGHT * entropy_score + HOMOPOLYMER_WEIGHT * run_score``:
  gc_score is 1 inside [GC_LOW, GC_HIGH] and falls linearly to 0 at 0.4 outside it; entropy_score is the
  window's codon entropy over its maximum log2(min(64, codons)) (0 under 2 codons); run_score is 1 for runs
  up to 4 and falls linearly to 0 at 12. avg/max/min/std (population) over the windows; 0 without windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

BACKEND = "heuristic"
MODEL_VERSION = "heuristic-v1.0"
WINDOW = 99
GC_WEIGHT, ENTROPY_WEIGHT, HOMOPOLYMER_WEIGHT = 0.5, 0.3, 0.2
GC_LOW, GC_HIGH, GC_FALLOFF = 0.4, 0.6, 0.4
RUN_FREE, RUN_FALLOFF = 4, 8

BASES = "ACGT"
CODONS = [a + b + c for a in BASES for b in BASES for c in BASES]
_CODE_TCAG = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
AMINO_ACID = {a + b + c: _CODE_TCAG[16 * "TCAG".index(a) + 4 * "TCAG".index(b) + "TCAG".index(c)]
              for a in "TCAG" for b in "TCAG" for c in "TCAG"}

# Escherichia coli K-12 codon usage, per thousand codons (genome-wide, rounded).
CODON_USAGE = {
    "TTT": 22.1, "TTC": 16.0, "TTA": 14.3, "TTG": 13.0, "CTT": 11.9, "CTC": 10.2, "CTA": 4.2, "CTG": 48.4,
    "ATT": 29.8, "ATC": 23.7, "ATA": 6.8, "ATG": 26.4, "GTT": 19.8, "GTC": 14.3, "GTA": 11.6, "GTG": 24.4,
    "TCT": 10.4, "TCC": 9.1, "TCA": 8.9, "TCG": 8.5, "CCT": 7.5, "CCC": 5.4, "CCA": 8.6, "CCG": 20.9,
    "ACT": 10.3, "ACC": 22.0, "ACA": 9.3, "ACG": 13.7, "GCT": 17.1, "GCC": 24.2, "GCA": 21.2, "GCG": 30.1,
    "TAT": 17.5, "TAC": 12.2, "TAA": 2.0, "TAG": 0.3, "CAT": 12.5, "CAC": 9.3, "CAA": 14.6, "CAG": 28.4,
    "AAT": 20.6, "AAC": 21.4, "AAA": 35.3, "AAG": 12.4, "GAT": 32.7, "GAC": 19.2, "GAA": 39.1, "GAG": 18.7,
    "TGT": 5.2, "TGC": 6.1, "TGA": 1.0, "TGG": 13.9, "CGT": 20.0, "CGC": 19.7, "CGA": 3.8, "CGG": 5.9,
    "AGT": 9.9, "AGC": 15.2, "AGA": 3.6, "AGG": 2.1, "GGT": 25.5, "GGC": 27.1, "GGA": 9.5, "GGG": 11.3,
}
_TOTAL_USAGE = sum(CODON_USAGE.values())
LN_P = {codon: math.log(CODON_USAGE[codon] / _TOTAL_USAGE) for codon in CODONS}
_BEST = {aa: max(CODON_USAGE[c] for c in CODONS if AMINO_ACID[c] == aa) for aa in set(AMINO_ACID.values())}
# ln w for the codons CAI counts: not Met (ATG), Trp (TGG) or a stop.
LN_W = {c: math.log(CODON_USAGE[c] / _BEST[AMINO_ACID[c]]) for c in CODONS
        if AMINO_ACID[c] not in "MW*"}

FIELDS = ("sequence_length", "avg_confidence", "max_confidence", "min_confidence", "std_confidence",
          "avg_loglik", "perplexity", "gc_content", "codon_entropy", "cai", "longest_homopolymer")


def _gc_score(gc: float) -> float:
    distance = max(0.0, GC_LOW - gc, gc - GC_HIGH)
    return 1.0 - min(1.0, distance / GC_FALLOFF)


def _run_score(run: int) -> float:
    return 1.0 - min(1.0, max(0, run - RUN_FREE) / RUN_FALLOFF)


def _entropy(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    return 0.0 - sum(c / total * math.log2(c / total) for c in counts.values() if c) if total else 0.0


def _codons(seq: str) -> list[str]:
    return [c for c in (seq[i:i + 3] for i in range(0, len(seq) - 2, 3)) if "N" not in c]


def _longest_run(seq: str) -> int:
    best = run = 0
    previous = ""
    for letter in seq:
        run = run + 1 if letter == previous and letter != "N" else (0 if letter == "N" else 1)
        previous = letter
        best = max(best, run)
    return best


def _gc(seq: str) -> float:
    bases = sum(1 for letter in seq if letter != "N")
    return sum(1 for letter in seq if letter in "GC") / bases if bases else 0.0


def reference(sequence: str) -> dict[str, Any]:
    """The features of one sequence, computed record by record in plain Python (the baseline)."""
    seq = sequence.upper()
    codons = _codons(seq)
    counts: dict[str, int] = {}
    for codon in codons:
        counts[codon] = counts.get(codon, 0) + 1
    scored = [LN_W[c] for c in codons if c in LN_W]
    avg_loglik = sum(LN_P[c] for c in codons) / len(codons) / 3 if codons else 0.0
    confidences = []
    for start in range(0, len(seq), WINDOW):
        window = seq[start:start + WINDOW]
        window_counts: dict[str, int] = {}
        for codon in _codons(window):
            window_counts[codon] = window_counts.get(codon, 0) + 1
        m = sum(window_counts.values())
        entropy_score = _entropy(window_counts) / math.log2(min(64, m)) if m >= 2 else 0.0
        confidences.append(GC_WEIGHT * _gc_score(_gc(window)) + ENTROPY_WEIGHT * entropy_score
                           + HOMOPOLYMER_WEIGHT * _run_score(_longest_run(window)))
    mean = sum(confidences) / len(confidences) if confidences else 0.0
    std = math.sqrt(sum((c - mean) ** 2 for c in confidences) / len(confidences)) if confidences else 0.0
    return {
        "sequence_length": len(seq),
        "avg_confidence": mean,
        "max_confidence": max(confidences, default=0.0),
        "min_confidence": min(confidences, default=0.0),
        "std_confidence": std,
        "avg_loglik": avg_loglik,
        "perplexity": math.exp(-avg_loglik),
        "gc_content": _gc(seq),
        "codon_entropy": _entropy(counts),
        "cai": math.exp(sum(scored) / len(scored)) if scored else 0.0,
        "longest_homopolymer": _longest_run(seq),
        "backend": BACKEND,
        "model_version": MODEL_VERSION,
    }


# Letter codes for the vectorised path: A C G T are 0-3, N is 4, padding 5.
_PAD = 5
_CODE = torch.full((256,), _PAD, dtype=torch.uint8)
for _i, _letter in enumerate("ACGTN"):
    _CODE[ord(_letter)] = _i
_LN_P = torch.tensor([LN_P[c] for c in CODONS] + [0.0], dtype=torch.float64)
_LN_W = torch.tensor([LN_W.get(c, 0.0) for c in CODONS] + [0.0], dtype=torch.float64)
_SCORED = torch.tensor([c in LN_W for c in CODONS] + [False], dtype=torch.float64)


def encode(sequences: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (batch, length), uint8, with A C G T N = 0-4 and padding 5, length a multiple of ``WINDOW``;
    lengths)."""
    longest = max((len(s) for s in sequences), default=0)
    width = -(-longest // WINDOW) * WINDOW
    blob = bytearray(b"".join(s.upper().encode("ascii").ljust(width, b"\0") for s in sequences))
    raw = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    raw = raw.view(len(sequences), width)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return _CODE[raw.long()].to(device), lengths.to(device)


def _runs(codes: torch.Tensor) -> torch.Tensor:
    """Each position's run length so far: how many times its base repeats up to it (0 on N and padding)."""
    position = torch.arange(codes.shape[1], device=codes.device, dtype=torch.int32).expand_as(codes)
    base = codes < 4
    previous = torch.nn.functional.pad(codes, (1, 0), value=_PAD)[:, :-1]
    start = (codes != previous) | ~base
    first = torch.cummax(torch.where(start, position, 0), dim=1).values
    return torch.where(base, position - first + 1, 0)


def _entropy_bits(counts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    p = counts / total.clamp(min=1).unsqueeze(-1)
    # 0.0 - x rather than -x: an empty sum gives 0.0, not -0.0.
    return 0.0 - torch.where(p > 0, p * torch.log2(p.clamp(min=1e-300)), torch.zeros_like(p)).sum(-1)


def extract_tensors(codes: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every feature of ``FIELDS`` as a (batch,) tensor, plus ``codon_counts`` (batch, 64)."""
    batch, width = codes.shape
    dev, f64 = codes.device, torch.float64
    windows = width // WINDOW
    base = codes < 4
    gc = (codes == 1) | (codes == 2)
    n_bases = base.sum(1).to(f64)
    gc_content = torch.where(n_bases > 0, gc.sum(1).to(f64) / n_bases.clamp(min=1), torch.zeros_like(n_bases))

    # Codon counts per window, in one bincount over (window, codon) keys; a codon with N or padding is key 64.
    triples = codes.view(batch, windows, WINDOW // 3, 3)
    ok = (triples < 4).all(3)
    wide = triples.long()
    index = torch.where(ok, wide[..., 0] * 16 + wide[..., 1] * 4 + wide[..., 2], 64)
    keys = index + torch.arange(batch * windows, device=dev).view(batch, windows, 1) * 65
    w_counts = torch.bincount(keys.flatten(), minlength=batch * windows * 65).view(batch, windows, 65)[..., :64]
    w_counts = w_counts.to(f64)
    counts = w_counts.sum(1)
    total = counts.sum(1)
    ln_p, ln_w, scored = _LN_P.to(dev), _LN_W.to(dev), _SCORED.to(dev)
    avg_loglik = torch.where(total > 0, (counts * ln_p[:64]).sum(1) / total.clamp(min=1) / 3, torch.zeros_like(total))
    n_scored = (counts * scored[:64]).sum(1)
    cai = torch.where(n_scored > 0, torch.exp((counts * ln_w[:64]).sum(1) / n_scored.clamp(min=1)),
                      torch.zeros_like(n_scored))

    runs = _runs(codes)
    longest = runs.max(1).values.long() if width else torch.zeros(batch, dtype=torch.long, device=dev)
    # A run seen inside a window is at most as long as the window so far.
    offset = torch.arange(1, WINDOW + 1, device=dev, dtype=torch.int32)
    window_runs = torch.minimum(runs.view(batch, windows, WINDOW), offset).max(2).values

    w_bases = base.view(batch, windows, WINDOW).sum(2).to(f64)
    w_gc = torch.where(w_bases > 0, gc.view(batch, windows, WINDOW).sum(2).to(f64) / w_bases.clamp(min=1),
                       torch.zeros_like(w_bases))
    distance = torch.clamp(torch.maximum(GC_LOW - w_gc, w_gc - GC_HIGH), min=0.0)
    gc_score = 1.0 - torch.clamp(distance / GC_FALLOFF, max=1.0)
    w_total = w_counts.sum(2)
    w_max = torch.log2(torch.clamp(w_total, min=2, max=64))
    entropy_score = torch.where(w_total >= 2, _entropy_bits(w_counts, w_total) / w_max, torch.zeros_like(w_total))
    run_score = 1.0 - torch.clamp((window_runs - RUN_FREE).clamp(min=0).to(f64) / RUN_FALLOFF, max=1.0)
    confidence = GC_WEIGHT * gc_score + ENTROPY_WEIGHT * entropy_score + HOMOPOLYMER_WEIGHT * run_score

    n_windows = torch.div(lengths + WINDOW - 1, WINDOW, rounding_mode="floor")
    present = torch.arange(windows, device=dev).unsqueeze(0) < n_windows.unsqueeze(1)
    count = n_windows.to(f64)
    zero = torch.zeros(batch, dtype=f64, device=dev)
    mean = torch.where(count > 0, (confidence * present).sum(1) / count.clamp(min=1), zero)
    spread = torch.where(present, (confidence - mean.unsqueeze(1)) ** 2, torch.zeros_like(confidence))
    has = count > 0
    return {
        "sequence_length": lengths,
        "avg_confidence": mean,
        "max_confidence": torch.where(has, torch.where(present, confidence, -math.inf).amax(1)
                                      if windows else zero, zero),
        "min_confidence": torch.where(has, torch.where(present, confidence, math.inf).amin(1)
                                      if windows else zero, zero),
        "std_confidence": torch.where(has, torch.sqrt(spread.sum(1) / count.clamp(min=1)), zero),
        "avg_loglik": avg_loglik,
        "perplexity": torch.exp(-avg_loglik),
        "gc_content": gc_content,
        "codon_entropy": _entropy_bits(counts, total),
        "cai": cai,
        "longest_homopolymer": longest,
        "codon_counts": counts,
    }


def extract(sequences: Sequence[str], device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """The features of every sequence (the same dicts as ``reference``), computed for the batch at once."""
    if not sequences:
        return []
    columns = extract_tensors(*encode(sequences, device))
    values = {name: columns[name].tolist() for name in FIELDS}
    return [dict({name: values[name][i] for name in FIELDS}, backend=BACKEND, model_version=MODEL_VERSION)
            for i in range(len(sequences))]
