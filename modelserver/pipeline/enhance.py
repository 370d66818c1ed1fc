"""Step 3, ``enhance``: the JSONL dataset and its features into the seed's enhanced JSONL.

Record i takes the features of element ``record_<i>`` of the features JSON. A record with successful features
gets its ``expression`` replaced by ``{value, unit: "estimated_enhanced", assay: "model_enhanced_heuristic",
confidence, original_value}`` (``enhanced``); every other field is kept as it was. A record without successful
features is written unchanged. Invariant: one output line per input record, in the input's order.

The enhancement (``factor``): the metadata estimate scaled by how much the sequence looks like a well-expressed
E. coli gene,

    value * (0.8 + 0.4 * avg_confidence + 0.05 * gc_term + 0.05 * adaptation + 0.02 * diversity)

- avg_confidence (0..1): the features' mean window confidence, so the confidence alone moves the value by
  -20 % .. +20 %;
- gc_term (-1..1): 1 at E. coli's genomic GC content (0.51), falling linearly to -1 at 0.15 away from it;
- adaptation (-1..1): (4 - perplexity) / 0.5, clamped; perplexity is per nucleotide under E. coli's codon
  usage, and 4 is what codons drawn uniformly give, so a lower one means better adapted codons (a CAI-like term);
- diversity (-1..1): codon_entropy - 5 bits, clamped: a gene using few codons reads as low-complexity.

The value is rounded to 2 places. The confidence rises one level (low -> medium -> high) when avg_confidence
is at least 0.8, and stays otherwise.

    python -m modelserver.pipeline.enhance --input Ec.jsonl --features Ec_evo2_features.json
        --output Ec_enhanced.jsonl [--limit N]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from modelserver.pipeline.streams import Progress, atomic_output, count_arg, count_lines, read_features, sigterm_exits

GC_OPTIMUM, GC_SPAN = 0.51, 0.15
UNIFORM_PERPLEXITY, PERPLEXITY_SPAN = 4.0, 0.5
ENTROPY_CENTRE = 5.0
CONFIDENT = 0.8
RAISE = {"low": "medium", "medium": "high", "high": "high"}

_EXPRESSION_KEY = b',"expression":{'
_SEQUENCE_FIRST = b'{"sequence":"'


def _clamp(x: float) -> float:
    return max(-1.0, min(1.0, x))


def factor(avg_confidence: float, gc_content: float, codon_entropy: float, perplexity: float) -> float:
    """What the metadata estimate is multiplied by (see the module's docstring)."""
    gc_term = 1.0 - 2.0 * min(1.0, abs(gc_content - GC_OPTIMUM) / GC_SPAN)
    adaptation = _clamp((UNIFORM_PERPLEXITY - perplexity) / PERPLEXITY_SPAN)
    diversity = _clamp(codon_entropy - ENTROPY_CENTRE)
    return 0.8 + 0.4 * avg_confidence + 0.05 * gc_term + 0.05 * adaptation + 0.02 * diversity


Features = tuple[float, float, float, float]  # avg_confidence, gc_content, codon_entropy, perplexity


def enhanced(expression: dict[str, Any], features: Features) -> dict[str, Any]:
    """The enhanced expression of a record whose metadata estimate is ``expression``."""
    original = expression.get("value")
    value = float(original) if isinstance(original, (int, float)) else 0.0
    confidence = str(expression.get("confidence") or "low")
    return {
        "value": round(value * factor(*features), 2),
        "unit": "estimated_enhanced",
        "assay": "model_enhanced_heuristic",
        "confidence": RAISE.get(confidence, confidence) if features[0] >= CONFIDENT else confidence,
        "original_value": original,
    }


def load_features(path: str | Path) -> dict[int, Features]:
    """The successful features by record index (``record_<i>``), streamed from the features JSON."""
    found: dict[int, Features] = {}
    for position, element in enumerate(read_features(path)):
        if element.get("status") != "success" or not isinstance(element.get("output"), dict):
            continue
        request_id = str((element.get("metadata") or {}).get("request_id") or "")
        index = int(request_id[7:]) if request_id.startswith("record_") and request_id[7:].isdigit() else position
        out = element["output"]
        try:
            found[index] = (float(out["avg_confidence"]), float(out["gc_content"]), float(out["codon_entropy"]),
                            float(out["perplexity"]))
        except (KeyError, TypeError, ValueError):
            continue
    return found


def enhance_line(line: bytes, features: Features) -> tuple[bytes, float]:
    """A record's line with its expression enhanced, and how much the value changed. A line laid out as step 1
    writes them has its expression object replaced in place; any other is parsed and written again."""
    start = line.find(_EXPRESSION_KEY) if line.startswith(_SEQUENCE_FIRST) else -1
    if start > 0 and line.find(b"{", 1, start) == -1:
        body = start + len(_EXPRESSION_KEY) - 1
        end = line.find(b"}", body) + 1
        try:
            expression = orjson.loads(line[body:end]) if end > 0 else None
        except orjson.JSONDecodeError:
            expression = None
        if isinstance(expression, dict):
            new = enhanced(expression, features)
            return line[:body] + orjson.dumps(new) + line[end:], _change(new)
    record = orjson.loads(line)
    new = enhanced(record.get("expression") or {}, features)
    record["expression"] = new
    return orjson.dumps(record) + b"\n", _change(new)


def _change(expression: dict[str, Any]) -> float:
    original = expression["original_value"]
    return abs(expression["value"] - (original if isinstance(original, (int, float)) else 0.0))


@dataclass
class Summary:
    total: int = 0
    enhanced: int = 0
    change: float = 0.0

    @property
    def mean_change(self) -> float:
        return self.change / self.enhanced if self.enhanced else 0.0

    def lines(self) -> list[str]:
        share = 100.0 * self.enhanced / self.total if self.total else 0.0
        return [f"Total records: {self.total}", f"Enhanced with Evo2: {self.enhanced} ({share:.1f}%)",
                f"Mean absolute change: {self.mean_change:.2f}"]


def enhance(input_path: str | Path, features_path: str | Path, output_path: str | Path,
            limit: int | None = None) -> Summary:
    """The enhanced JSONL of ``input_path`` with the features of ``features_path`` written to ``output_path``."""
    features = load_features(features_path)
    total = count_lines(input_path)
    progress = Progress(total=min(total, limit) if limit is not None else total)
    summary = Summary()
    with open(input_path, "rb") as f, atomic_output(output_path) as out:
        lines = (line for line in f if not line.isspace())
        batch: list[bytes] = []
        for index, line in enumerate(itertools.islice(lines, limit)):
            if not line.endswith(b"\n"):
                line += b"\n"
            found = features.get(index)
            if found is None:
                batch.append(line)
            else:
                new, change = enhance_line(line, found)
                batch.append(new)
                summary.enhanced += 1
                summary.change += change
            summary.total += 1
            if len(batch) >= 1024:
                out.write(b"".join(batch))
                batch.clear()
                progress.update(summary.enhanced, summary.total - summary.enhanced)
        out.write(b"".join(batch))
    progress.update(summary.enhanced, summary.total - summary.enhanced)
    progress.finish()
    for text in summary.lines():
        print(text, flush=True)
    print(f"✓ Enhanced dataset created: {output_path}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelserver.pipeline.enhance", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="the JSONL dataset (step 1's output)")
    parser.add_argument("--features", required=True, help="the features JSON (step 2's output)")
    parser.add_argument("--output", required=True, help="the enhanced JSONL to write")
    parser.add_argument("--limit", type=count_arg, default=None, help="process at most this many records")
    args = parser.parse_args(argv)
    try:
        with sigterm_exits():
            enhance(args.input, args.features, args.output, args.limit)
    except (OSError, orjson.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
