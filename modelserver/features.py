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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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


# Letter codes for the vectorised path: A C G T are 0-3, N is 4, anything else (padding) 5, either case; the
# bytes are translated before torch sees them. Bit 2 is set exactly for N and padding.
_PAD = 5
_CODE = bytes(_PAD if chr(b).upper() not in "ACGTN" else "ACGTN".index(chr(b).upper()) for b in range(256))
_LN_P = torch.tensor([LN_P[c] for c in CODONS], dtype=torch.float64)
_LN_W = torch.tensor([LN_W.get(c, 0.0) for c in CODONS], dtype=torch.float64)
_SCORED = torch.tensor([c in LN_W for c in CODONS], dtype=torch.float64)
# One matrix product gives, per sequence, the sums of ln p, of ln w and the number of codons CAI counts.
_CODON_WEIGHTS = torch.stack([_LN_P, _LN_W, _SCORED], 1)
_CODONS_PER_WINDOW = WINDOW // 3
# Key 64: a codon with an N or padding, counted apart and left out of every codon feature.
_NO_CODON = 64


@dataclass(frozen=True)
class Packed:
    """A batch laid out as windows: row r of ``codes`` (rows, WINDOW), uint8, A C G T N = 0-4 and padding 5,
    is window ``r - first_row[seq]`` of sequence ``row_seq[r]``; sequence i has ``windows[i]`` rows."""

    codes: torch.Tensor
    row_seq: torch.Tensor
    first_row: torch.Tensor
    windows: torch.Tensor
    lengths: torch.Tensor


def encode(sequences: Sequence[str], device: torch.device | str = "cpu") -> Packed:
    """The batch packed into windows, each sequence padded to a whole number of windows (no padding to the
    longest: a batch costs what its sequences' lengths add up to)."""
    sizes = [len(s) for s in sequences]
    blob = bytearray("".join([s.ljust(n + -n % WINDOW, "\0") for s, n in zip(sequences, sizes, strict=True)])
                     .encode("ascii").translate(_CODE))
    codes = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
    lengths = torch.tensor(sizes, dtype=torch.long)
    windows = torch.tensor([-(-n // WINDOW) for n in sizes], dtype=torch.long)
    first_row = torch.cumsum(windows, 0) - windows
    row_seq = torch.repeat_interleave(torch.arange(len(sequences)), windows)
    return Packed(codes.view(-1, WINDOW).to(device), row_seq.to(device), first_row.to(device), windows.to(device),
                  lengths.to(device))


def _clog2(limit: int, device: torch.device) -> torch.Tensor:
    """c * log2(c) for c in 0..limit (0 for 0): entropies from integer counts by one lookup."""
    c = torch.arange(limit + 1, dtype=torch.float64, device=device)
    return c * torch.log2(c.clamp(min=1))


def _entropy_bits(counts: torch.Tensor, total: torch.Tensor, clog: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of integer ``counts`` summing to ``total``: log2 m - sum(c log2 c) / m."""
    m = total.to(torch.float64)
    h = torch.log2(m.clamp(min=1)) - torch.take(clog, counts).sum(-1) / m.clamp(min=1)
    # 0.0 + clamp: an empty row gives 0.0, not -0.0, and rounding never gives a hair below 0.
    return torch.where(total > 0, h.clamp(min=0.0), 0.0) + 0.0


def _segment(values: torch.Tensor, row_seq: torch.Tensor, batch: int, reduce: str) -> torch.Tensor:
    """Per sequence: ``reduce`` (sum, amax, amin) of its rows' ``values``; 0 for a sequence without rows."""
    out = values.new_zeros([batch] + list(values.shape[1:]))
    if reduce == "sum":
        return out.index_add_(0, row_seq, values)
    index = row_seq.unsqueeze(1).expand_as(values) if values.dim() == 2 else row_seq
    return out.scatter_reduce_(0, index, values, reduce, include_self=False)


class _Kernel(torch.nn.Module):
    """The vectorised features as one TorchScript module (its constants compiled in)."""

    __constants__ = ["window", "codons_per_window", "no_codon", "gc_low", "gc_high", "gc_falloff", "run_free",
                     "run_falloff", "gc_weight", "entropy_weight", "homopolymer_weight"]

    def __init__(self) -> None:
        super().__init__()
        self.window = WINDOW
        self.codons_per_window = _CODONS_PER_WINDOW
        self.no_codon = _NO_CODON
        self.gc_low = GC_LOW
        self.gc_high = GC_HIGH
        self.gc_falloff = GC_FALLOFF
        self.run_free = RUN_FREE
        self.run_falloff = RUN_FALLOFF
        self.gc_weight = GC_WEIGHT
        self.entropy_weight = ENTROPY_WEIGHT
        self.homopolymer_weight = HOMOPOLYMER_WEIGHT

    def runs(self, codes: torch.Tensor, bases: torch.Tensor, first_row: torch.Tensor, windows: torch.Tensor,
             row_seq: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The longest homopolymer run of each window (counted from the window's start) and of each sequence
        (across its windows), int32. ``bases`` (rows, WINDOW), uint8, is 1 where the letter is one of A C G T.

        ``streak`` starts 1 where a base repeats the letter before it in its sequence; the run at a base is 1 plus the
        number of consecutive such ones ending there (0 on N and padding). That count is built by doubling: with
        ``streak`` the count capped at 2**k, a position whose count reached the cap adds the capped count 2**k
        positions back, which caps it at 2**(k + 1); once no count reaches its cap, every count is exact. So a batch
        costs a few elementwise passes per doubling of its longest run, in uint8 while the counts fit in it."""
        rows = codes.shape[0]
        flat = codes.view(-1)
        streak = torch.zeros(flat.shape, dtype=torch.uint8, device=codes.device)
        if rows > 0:
            streak[1:] = flat[1:] == flat[:-1]
            streak.view(rows, self.window).select(1, 0).index_fill_(0, first_row[windows > 0], 0)
            streak.mul_(bases.view(-1))
        cap, shift = 1, 0
        while rows > 0 and int(streak.max()) >= cap:
            if cap == 128:
                streak = streak.int()  # the next doubling needs more than 8 bits
            streak[cap:].add_(torch.bitwise_right_shift(streak[cap:], shift) * streak[:-cap])
            cap, shift = cap * 2, shift + 1
        runs = streak.view(rows, self.window) + bases
        # A run seen inside a window is at most as long as the window so far.
        offset = torch.arange(1, self.window + 1, device=codes.device, dtype=runs.dtype)
        window_runs = torch.minimum(runs, offset).int().amax(1)
        return window_runs, _segment(runs.int().amax(1), row_seq, batch, "amax")

    def forward(self, codes: torch.Tensor, row_seq: torch.Tensor, first_row: torch.Tensor, windows: torch.Tensor,
                  lengths: torch.Tensor, codon_weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``extract_tensors`` on a ``Packed`` batch's tensors; ``codon_weights`` is ``_CODON_WEIGHTS``."""
        dev, f64, i32 = codes.device, torch.float64, torch.int32
        rows, batch = codes.shape[0], lengths.shape[0]

        # Letters per window: bases (A C G T: bit 2 clear) and G + C (C = 01, G = 10: the two low bits differ).
        bases = torch.bitwise_xor(torch.bitwise_right_shift(codes, 2), 1)
        w_bases = bases.sum(1, dtype=i32)
        w_gc = torch.bitwise_and(torch.bitwise_xor(codes, torch.bitwise_right_shift(codes, 1)), bases).sum(1, dtype=i32)
        # Codon keys 0-63 (16 a + 4 b + c), or _NO_CODON when a letter is N or padding (bit 2), from shifted copies
        # of the whole batch (contiguous, so cheap), keeping every third.
        flat = codes.view(-1)
        keys = torch.zeros((0, self.codons_per_window), dtype=i32, device=dev)
        if rows > 0:
            first, second, third = flat[:-2], flat[1:-1], flat[2:]
            packed = torch.bitwise_or(torch.bitwise_or(torch.bitwise_left_shift(first, 4),
                                                       torch.bitwise_left_shift(second, 2)), third)
            bad = torch.bitwise_and(torch.bitwise_or(torch.bitwise_or(first, second), third), 4)
            whole = torch.bitwise_or(torch.bitwise_and(packed, 63), torch.bitwise_left_shift(bad, 4))
            keys = whole[::3].clamp_(max=self.no_codon).to(i32).view(rows, self.codons_per_window)
        # Codon counts per window and per sequence, one bincount each over (window or sequence, key) pairs.
        row_keys = keys + torch.arange(0, rows * 65, 65, device=dev, dtype=i32).unsqueeze(1)
        w_counts = torch.bincount(row_keys.view(-1), minlength=rows * 65).view(rows, 65)
        w_total = self.codons_per_window - w_counts.select(1, self.no_codon)
        w_counts.select(1, self.no_codon).zero_()
        seq_keys = keys + (row_seq * 65).to(i32).unsqueeze(1)
        counts = torch.bincount(seq_keys.view(-1), minlength=batch * 65).view(batch, 65)[:, :self.no_codon]
        window_runs, longest = self.runs(codes, bases, first_row, windows, row_seq, batch)

        gc_frac = torch.where(w_bases > 0, w_gc.to(f64) / w_bases.clamp(min=1), 0.0)
        distance = torch.clamp(torch.maximum(self.gc_low - gc_frac, gc_frac - self.gc_high), min=0.0)
        gc_score = 1.0 - torch.clamp(distance / self.gc_falloff, max=1.0)
        w_max = torch.log2(torch.clamp(w_total, min=2, max=64).to(f64))
        entropy_score = torch.where(w_total >= 2, _entropy_bits(w_counts, w_total, _clog2(self.codons_per_window, dev))
                                    / w_max, 0.0)
        run_score = 1.0 - torch.clamp((window_runs - self.run_free).clamp(min=0).to(f64) / self.run_falloff, max=1.0)
        confidence = self.gc_weight * gc_score + self.entropy_weight * entropy_score + self.homopolymer_weight * run_score

        n_windows = windows.to(f64).clamp(min=1)
        mean = _segment(confidence, row_seq, batch, "sum") / n_windows
        spread = _segment((confidence - mean.index_select(0, row_seq)) ** 2, row_seq, batch, "sum")

        total = counts.sum(1)
        bases_gc = _segment(torch.stack([w_bases, w_gc], 1), row_seq, batch, "sum")
        seq_bases, gc_count = bases_gc[:, 0], bases_gc[:, 1]
        per_codon = total.to(f64).clamp(min=1)
        sums = counts.to(f64) @ codon_weights
        avg_loglik = torch.where(total > 0, sums[:, 0] / per_codon / 3, 0.0)
        n_scored = sums[:, 2]
        cai = torch.where(n_scored > 0, torch.exp(sums[:, 1] / n_scored.clamp(min=1)), 0.0)
        longest_possible = int(total.max()) if batch > 0 else 0
        return {
            "sequence_length": lengths,
            "avg_confidence": mean,
            "max_confidence": _segment(confidence, row_seq, batch, "amax"),
            "min_confidence": _segment(confidence, row_seq, batch, "amin"),
            "std_confidence": torch.sqrt(spread / n_windows),
            "avg_loglik": avg_loglik,
            "perplexity": torch.exp(-avg_loglik),
            "gc_content": torch.where(seq_bases > 0, gc_count.to(f64) / seq_bases.clamp(min=1), 0.0),
            "codon_entropy": _entropy_bits(counts, total, _clog2(longest_possible, dev)),
            "cai": cai,
            "longest_homopolymer": longest,
            "codon_counts": counts,
        }


# Compiled once, as one TorchScript graph: it runs without the GIL and without Python between its operations,
# so the server's event loop keeps its core while a batch computes (torch.jit.script is deprecated in favour
# of torch.compile, which needs a C++ toolchain at run time and compiles per shape).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _KERNEL = torch.jit.script(_Kernel())


def extract_tensors(packed: Packed) -> dict[str, torch.Tensor]:
    """Every feature of ``FIELDS`` as a (batch,) tensor, plus ``codon_counts`` (batch, 64)."""
    weights = _CODON_WEIGHTS.to(packed.codes.device)
    return _KERNEL(packed.codes, packed.row_seq, packed.first_row, packed.windows, packed.lengths, weights)


def extract(sequences: Sequence[str], device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """The features of every sequence (the same dicts as ``reference``), computed for the batch at once."""
    if not sequences:
        return []
    columns = extract_tensors(encode(sequences, device))
    values = {name: columns[name].tolist() for name in FIELDS}
    return [dict({name: values[name][i] for name in FIELDS}, backend=BACKEND, model_version=MODEL_VERSION)
            for i in range(len(sequences))]
