"""A synthetic, E. coli-like UniProt TSV for seed 001's pipeline, deterministic for a seed.

Each row has a coding sequence of ATG, codons drawn from E. coli's codon usage (``modelserver.features``'s
table, stops left out) and a stop, and its translation as the protein (without the stop); protein lengths are
log-normal about 280 residues, within 50..1200. About a third of the rows are reviewed; locations, names and
identifiers come from small lists. A few rows are made invalid on purpose, one kind each in turn, so the
converter's skip rules and the feature step's error path are exercised: an empty RefSeq_nn, a coding sequence
one base short, a protein five residues short, an empty Entry, and a coding sequence with an ambiguity code
(``R``, a valid row whose features are an error).

    python -m modelserver.pipeline.dataset --records 52000 --out Ec.tsv --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from modelserver.features import AMINO_ACID, CODON_USAGE
from modelserver.pipeline.convert import COLUMNS
from modelserver.pipeline.streams import atomic_output, count_arg, sigterm_exits

SENSE = [c for c in CODON_USAGE if AMINO_ACID[c] != "*"]
STOPS = [c for c in CODON_USAGE if AMINO_ACID[c] == "*"]
LOCATIONS = (
    "SUBCELLULAR LOCATION: Cytoplasm {ECO:0000269}.",
    "SUBCELLULAR LOCATION: Cytoplasm, cytosol {ECO:0000305}.",
    "SUBCELLULAR LOCATION: Cell inner membrane {ECO:0000255}; Multi-pass membrane protein.",
    "SUBCELLULAR LOCATION: Cell outer membrane {ECO:0000269}.",
    "SUBCELLULAR LOCATION: Periplasm {ECO:0000269}.",
    "SUBCELLULAR LOCATION: Secreted {ECO:0000305}.",
    "SUBCELLULAR LOCATION: Cytoplasm; ribosome {ECO:0000255|HAMAP-Rule}.",
    "",
    "",
)
PROTEINS = ("DNA-directed RNA polymerase subunit", "Outer membrane protein", "ABC transporter ATP-binding protein",
            "50S ribosomal protein", "Transcriptional regulator", "Uncharacterized protein",
            "Chaperone protein", "Glutamate synthase", "Putative lipoprotein", "Elongation factor")
ORGANISM = "Escherichia coli (strain K12)"
INVALID_EVERY = 100  # one row in this many is made invalid (or carries an ambiguity code)
_LETTERS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
_DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)


def _accession(rng: np.random.Generator, n: int) -> list[str]:
    """UniProt-like accessions: [OPQ] digit, three of letters/digits, a digit."""
    alnum = np.concatenate([_LETTERS, _DIGITS])
    first = np.frombuffer(b"OPQ", dtype=np.uint8)[rng.integers(0, 3, n)]
    middle = alnum[rng.integers(0, len(alnum), (n, 3))]
    cols = [first, _DIGITS[rng.integers(0, 10, n)], *middle.T, _DIGITS[rng.integers(0, 10, n)]]
    text = np.stack(cols, 1).tobytes().decode("ascii")
    return [text[6 * i:6 * i + 6] for i in range(n)]


def rows(records: int, seed: int, first: int = 0) -> list[list[str]]:
    """The rows (cells in ``COLUMNS`` order) numbered ``first`` to ``first + records - 1`` of a dataset, drawn
    from ``seed``."""
    rng = np.random.default_rng(seed)
    usage = np.array([CODON_USAGE[c] for c in SENSE], dtype=np.float64)
    codon_bytes = np.frombuffer("".join(SENSE).encode("ascii"), dtype=np.uint8).reshape(-1, 3)
    aa_bytes = np.frombuffer("".join(AMINO_ACID[c] for c in SENSE).encode("ascii"), dtype=np.uint8)
    lengths = np.clip(np.rint(rng.lognormal(np.log(280), 0.55, records)), 50, 1200).astype(np.int64)
    # Every protein's residues after its Met, drawn at once, then cut per row.
    body = rng.choice(len(SENSE), size=int((lengths - 1).sum()), p=usage / usage.sum())
    nt_all = codon_bytes[body].tobytes().decode("ascii")
    aa_all = aa_bytes[body].tobytes().decode("ascii")
    stops = rng.integers(0, len(STOPS), records)
    reviewed = rng.random(records) < 0.33
    location = rng.integers(0, len(LOCATIONS), records)
    protein = rng.integers(0, len(PROTEINS), records)
    accessions = _accession(rng, records)
    genes = ["".join(chr(c) for c in g[:3]).lower() + chr(g[3]) for g in _LETTERS[rng.integers(0, 26, (records, 4))]]
    refseq = rng.integers(0, 10**9, records)

    out = []
    start = 0
    for i in range(records):
        number = first + i
        n = int(lengths[i]) - 1
        nt = "ATG" + nt_all[3 * start:3 * (start + n)] + STOPS[stops[i]]
        aa = "M" + aa_all[start:start + n]
        start += n
        entry = accessions[i]
        if number % INVALID_EVERY == INVALID_EVERY - 1:
            kind = (number // INVALID_EVERY) % 5
            if kind == 0:
                nt = ""
            elif kind == 1:
                nt = nt[:-1]
            elif kind == 2:
                aa = aa[:-5]
            elif kind == 3:
                entry = ""
            else:
                nt = nt[:30] + "R" + nt[31:]
        gene = genes[i]
        out.append([
            entry, "reviewed" if reviewed[i] else "unreviewed", f"{gene.upper()}_ECOLI",
            f"{PROTEINS[protein[i]]} {gene}", f"{gene} b{1000 + number % 9000}", ORGANISM, str(n + 1),
            LOCATIONS[location[i]], f"WP_{refseq[i]:09d}.1", "NC_000913.3", nt, aa,
        ])
    return out


def write(path: str | Path, records: int, seed: int = 0) -> None:
    """The dataset written as a TSV with the seed's header, atomically."""
    with atomic_output(path) as out:
        out.write(("\t".join(COLUMNS) + "\n").encode("ascii"))
        batch = 4096
        for first in range(0, records, batch):
            chunk = rows(min(batch, records - first), seed * 1_000_003 + first, first)
            out.write("".join("\t".join(cells) + "\n" for cells in chunk).encode("ascii"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelserver.pipeline.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=count_arg, default=52_000, help="rows to write (a few invalid on purpose)")
    parser.add_argument("--out", required=True, help="the TSV to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with sigterm_exits():
        write(args.out, args.records, args.seed)
    print(f"✓ Wrote {args.records:,} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
