"""Step 1, ``convert``: a UniProt-style TSV into the seed's JSONL dataset, one record a line.

A row becomes a record with the sequences cleaned (upper-cased, whitespace and ``*`` removed), the host read
from the organism, and an expression estimate from its metadata (``estimate_expression``). A row is skipped,
and counted by reason, when Entry, RefSeq_nn or RefSeq_aa is empty, when the coding sequence's length is not a
multiple of 3, or when the protein's length differs from a third of it by more than 1. Invariant: the output
holds exactly the valid rows, in the input's order (the first ``--limit`` of them with a limit).

    python -m modelserver.pipeline.convert --input Ec.tsv --output Ec.jsonl [--limit N]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from modelserver.pipeline.streams import Progress, StepError, atomic_output, count_arg, count_lines, sigterm_exits

COLUMNS = ("Entry", "Reviewed", "Entry Name", "Protein names", "Gene Names", "Organism", "Length",
           "Subcellular location [CC]", "RefSeq_id", "Genome_id", "RefSeq_nn", "RefSeq_aa")
REQUIRED = ("Entry", "RefSeq_nn", "RefSeq_aa")

# The seed's hosts: an organism naming one of these species exactly, else the first whose keyword it contains.
HOSTS = {"escherichia coli": "E_coli", "homo sapiens": "Human", "mus musculus": "Mouse",
         "pichia pastoris": "P_pastoris", "saccharomyces cerevisiae": "S_cerevisiae"}
HOST_KEYWORDS = (("coli", "E_coli"), ("human", "Human"), ("sapiens", "Human"), ("mouse", "Mouse"),
                 ("musculus", "Mouse"), ("pastoris", "P_pastoris"), ("komagataella", "P_pastoris"),
                 ("pichia", "P_pastoris"), ("cerevisiae", "S_cerevisiae"), ("saccharomyces", "S_cerevisiae"),
                 ("yeast", "S_cerevisiae"))
DEFAULT_HOST = "E_coli"

SKIP_MISSING = "missing Entry, RefSeq_nn or RefSeq_aa"
SKIP_FRAME = "coding sequence length not a multiple of 3"
SKIP_MISMATCH = "protein length differs from the coding sequence's"

_DROP = str.maketrans("", "", " \t\r\n\v\f*")


def host_of(organism: str) -> str:
    name = organism.lower()
    for species, host in HOSTS.items():
        if name.startswith(species):
            return host
    for keyword, host in HOST_KEYWORDS:
        if keyword in name:
            return host
    return DEFAULT_HOST


def estimate_expression(reviewed: bool, location: str, length: int) -> tuple[float, str]:
    """The seed's metadata heuristic: (value, confidence).

    Base 50; a reviewed entry +20 and confidence ``medium`` (else ``low``); by subcellular location
    cytoplasm/cytosol +15, ribosome +30 (and confidence ``medium``), membrane -10, secreted/extracellular -5
    (each that the location mentions); a protein of 100..500 residues +10, under 50 or over 1000 -10; at
    least 10."""
    value = 50.0
    confidence = "low"
    if reviewed:
        value += 20
        confidence = "medium"
    where = location.lower()
    if "cytoplasm" in where or "cytosol" in where:
        value += 15
    if "ribosom" in where:
        value += 30
        confidence = "medium"
    if "membrane" in where:
        value -= 10
    if "secreted" in where or "extracellular" in where:
        value -= 5
    if 100 <= length <= 500:
        value += 10
    elif length < 50 or length > 1000:
        value -= 10
    return max(10.0, value), confidence


def clean(sequence: str) -> str:
    """Upper-cased, without whitespace or ``*`` (a translated stop)."""
    if sequence.isalpha():  # the common case, checked faster than the general one is done
        return sequence.upper()
    return sequence.translate(_DROP).upper()


def skip_reason(entry: str, nt: str, aa: str) -> str | None:
    """Why a row (its Entry and cleaned sequences) is not a record, or None when it is one."""
    if not entry or not nt or not aa:
        return SKIP_MISSING
    if len(nt) % 3:
        return SKIP_FRAME
    if abs(len(aa) - len(nt) // 3) > 1:
        return SKIP_MISMATCH
    return None


def record(row: dict[str, str], nt: str, aa: str, source_file: str) -> dict[str, Any]:
    """The JSONL record of a valid row (``row``: column -> stripped value, every column of ``COLUMNS``)."""
    reviewed = row["Reviewed"].lower() == "reviewed"
    length_text = row["Length"]
    length = int(length_text) if length_text.isdigit() else len(aa)
    value, confidence = estimate_expression(reviewed, row["Subcellular location [CC]"], length)
    return {
        "sequence": nt,
        "protein_aa": aa,
        "host": host_of(row["Organism"]),
        "expression": {"value": value, "unit": "estimated", "assay": "metadata_heuristic", "confidence": confidence},
        "extra_features": {"length": length, "reviewed": reviewed, "source_file": source_file},
        "metadata": {
            "uniprot_id": row["Entry"],
            "entry_name": row["Entry Name"],
            "protein_names": row["Protein names"],
            "gene_names": row["Gene Names"],
            "organism": row["Organism"],
            "subcellular_location": row["Subcellular location [CC]"],
            "refseq_id": row["RefSeq_id"],
            "genome_id": row["Genome_id"],
        },
    }


@dataclass
class Counts:
    rows: int = 0
    valid: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


class BadInput(StepError):
    """The input is not a TSV this step reads (its header lacks a required column)."""


def records(path: str | Path, counts: Counts, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The records of the TSV at ``path``, streamed; ``counts`` is kept up to date as rows are read."""
    source_file = Path(path).name
    try:
        yield from _records(path, source_file, counts, limit)
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text ({exc})") from None


def _records(path: str | Path, source_file: str, counts: Counts, limit: int | None) -> Iterator[dict[str, Any]]:
    # utf-8-sig: a spreadsheet's export starts with a byte order mark, which is no part of the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        index = {name.strip(): i for i, name in enumerate(header)}
        missing = [name for name in REQUIRED if name not in index]
        if missing:
            raise BadInput(f"{path}: the header has no column {', '.join(missing)} (columns: {', '.join(header)})")
        wanted = [(name, index.get(name)) for name in COLUMNS]
        entry_at, nt_at, aa_at = index["Entry"], index["RefSeq_nn"], index["RefSeq_aa"]
        for line in f:
            cells = line.rstrip("\r\n").split("\t")
            if len(cells) == 1 and not cells[0].strip():
                continue
            counts.rows += 1
            n = len(cells)
            entry = cells[entry_at].strip() if entry_at < n else ""
            nt = clean(cells[nt_at]) if nt_at < n else ""
            aa = clean(cells[aa_at]) if aa_at < n else ""
            reason = skip_reason(entry, nt, aa)
            if reason:
                counts.skipped[reason] += 1
                continue
            row = {name: cells[i].strip() if i is not None and i < n else "" for name, i in wanted}
            counts.valid += 1
            yield record(row, nt, aa, source_file)
            if limit is not None and counts.valid >= limit:
                return


def convert(input_path: str | Path, output_path: str | Path, limit: int | None = None) -> Counts:
    """The TSV at ``input_path`` written as the JSONL at ``output_path``; what was read and skipped."""
    counts = Counts()
    progress = Progress(total=max(0, count_lines(input_path) - 1))
    print(f"Processing {Path(input_path).name}...", flush=True)
    with atomic_output(output_path) as out:
        lines: list[bytes] = []
        for rec in records(input_path, counts, limit):
            lines.append(orjson.dumps(rec))
            if len(lines) >= 1024:
                out.write(b"\n".join(lines) + b"\n")
                lines.clear()
                progress.update(counts.valid, counts.rows - counts.valid)
        if lines:
            out.write(b"\n".join(lines) + b"\n")
    progress.update(counts.valid, counts.rows - counts.valid)
    progress.finish()
    print(f"✓ Parsed {counts.valid:,} valid records", flush=True)
    if counts.skipped:
        print(f"  Skipped {sum(counts.skipped.values()):,} rows: "
              + "; ".join(f"{reason}: {n}" for reason, n in sorted(counts.skipped.items())), flush=True)
    print(f"✓ JSONL dataset created: {output_path}", flush=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelserver.pipeline.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="the UniProt-style TSV")
    parser.add_argument("--output", required=True, help="the JSONL to write")
    parser.add_argument("--limit", type=count_arg, default=None, help="stop after this many valid records")
    args = parser.parse_args(argv)
    try:
        with sigterm_exits():
            convert(args.input, args.output, args.limit)
    except (StepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
