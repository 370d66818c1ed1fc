"""Seed 001's pipeline steps (modelserver.pipeline): the seed's formats, the skip rules, --limit, the progress
file, features equal to the per-record reference, and the one-process runner end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from modelserver import features as kernel_features
from modelserver.pipeline import convert, dataset, enhance, features, run, streams
from tests.support.poll import wait_until

ROOT = Path(__file__).resolve().parents[2]
RECORD_KEYS = ["sequence", "protein_aa", "host", "expression", "extra_features", "metadata"]
METADATA_KEYS = ["uniprot_id", "entry_name", "protein_names", "gene_names", "organism", "subcellular_location",
                 "refseq_id", "genome_id"]
OUTPUT_KEYS = ["sequence", "sequence_length", "avg_confidence", "max_confidence", "min_confidence",
               "std_confidence", "avg_loglik", "perplexity", "gc_content", "codon_entropy", "backend",
               "model_version"]
ROWS = 500  # five invalid rows, one of each kind (dataset.INVALID_EVERY)


@pytest.fixture(scope="module")
def tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seed001") / "Ec.tsv"
    dataset.write(path, ROWS, seed=7)
    return path


@pytest.fixture(scope="module")
def jsonl(tsv: Path) -> Path:
    out = tsv.with_name("Ec.jsonl")
    convert.convert(tsv, out)
    return out


@pytest.fixture(scope="module")
def features_json(jsonl: Path) -> Path:
    out = jsonl.with_name("Ec_evo2_features.json")
    assert features.main(["--input", str(jsonl), "--output", str(out), "--batch-size", "256"]) == 0
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_tsv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("\t".join(convert.COLUMNS) + "\n"
                    + "".join("\t".join(row.get(c, "") for c in convert.COLUMNS) + "\n" for row in rows))
    return path


def test_the_dataset_is_deterministic_realistic_and_has_each_invalid_kind(tsv: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.tsv"
    dataset.write(again, ROWS, seed=7)
    assert again.read_bytes() == tsv.read_bytes()
    dataset.write(tmp_path / "other.tsv", ROWS, seed=8)
    assert (tmp_path / "other.tsv").read_bytes() != tsv.read_bytes()

    header, *rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert header == list(convert.COLUMNS) and len(rows) == ROWS
    col = {name: i for i, name in enumerate(header)}
    valid = [r for r in rows if convert.skip_reason(r[col["Entry"]], r[col["RefSeq_nn"]], r[col["RefSeq_aa"]]) is None
             and "R" not in r[col["RefSeq_nn"]]]
    assert len(valid) == ROWS - 5
    for r in valid:
        nt, aa = r[col["RefSeq_nn"]], r[col["RefSeq_aa"]]
        assert nt.startswith("ATG") and kernel_features.AMINO_ACID[nt[-3:]] == "*"
        assert "".join(kernel_features.AMINO_ACID[nt[i:i + 3]] for i in range(0, len(nt) - 3, 3)) == aa
        assert 50 <= len(aa) <= 1200 and int(r[col["Length"]]) == len(aa)
    lengths = sorted(len(r[col["RefSeq_aa"]]) for r in valid)
    assert 200 <= lengths[len(lengths) // 2] <= 360
    assert {r[col["Reviewed"]] for r in rows} == {"reviewed", "unreviewed"}


def test_convert_writes_the_seeds_records_and_counts_the_skipped_rows(tsv: Path, jsonl: Path) -> None:
    records = lines(jsonl)
    assert len(records) == ROWS - 4  # the row with an ambiguity code is a valid row
    for rec in records:
        assert list(rec) == RECORD_KEYS
        assert list(rec["expression"]) == ["value", "unit", "assay", "confidence"]
        assert rec["expression"]["unit"] == "estimated" and rec["expression"]["assay"] == "metadata_heuristic"
        assert list(rec["extra_features"]) == ["length", "reviewed", "source_file"]
        assert list(rec["metadata"]) == METADATA_KEYS
        assert rec["host"] == "E_coli" and rec["extra_features"]["source_file"] == "Ec.tsv"
        assert rec["expression"]["value"] >= 10 and isinstance(rec["expression"]["value"], float)
        assert len(rec["sequence"]) == 3 * len(rec["protein_aa"]) + 3

    counts = convert.Counts()
    assert sum(1 for _ in convert.records(tsv, counts)) == ROWS - 4
    assert counts.rows == ROWS and dict(counts.skipped) == {
        convert.SKIP_MISSING: 2, convert.SKIP_FRAME: 1, convert.SKIP_MISMATCH: 1}


def test_convert_cleans_sequences_and_applies_each_skip_rule(tmp_path: Path) -> None:
    good = {"Entry": "P12345", "Reviewed": "reviewed", "Organism": "Homo sapiens (Human)", "Length": "3",
            "Subcellular location [CC]": "SUBCELLULAR LOCATION: Cytoplasm.",
            "RefSeq_nn": " atg gct  AAA taa ", "RefSeq_aa": "MAK*"}
    rows = [
        good,
        dict(good, Entry=""),
        dict(good, RefSeq_nn=""),
        dict(good, RefSeq_aa="  "),
        dict(good, RefSeq_nn="ATGGCTAAATA"),      # 11 bases
        dict(good, RefSeq_aa="MAKLL"),            # 5 residues for 4 codons: off by 1, kept
        dict(good, RefSeq_aa="MAKLLL"),           # off by 2
        dict(good, Entry="Q1", Organism="Rattus norvegicus", RefSeq_aa="MAKL"),
    ]
    out = tmp_path / "x.jsonl"
    counts = convert.convert(write_tsv(tmp_path / "x.tsv", rows), out)
    records = lines(out)
    assert [r["metadata"]["uniprot_id"] for r in records] == ["P12345", "P12345", "Q1"]
    first = records[0]
    assert first["sequence"] == "ATGGCTAAATAA" and first["protein_aa"] == "MAK"
    assert first["host"] == "Human" and records[2]["host"] == "E_coli"
    assert first["extra_features"] == {"length": 3, "reviewed": True, "source_file": "x.tsv"}
    # 50 + 20 (reviewed) + 15 (cytoplasm) - 10 (under 50 residues)
    assert first["expression"] == {"value": 75.0, "unit": "estimated", "assay": "metadata_heuristic",
                                   "confidence": "medium"}
    assert counts.rows == 8 and dict(counts.skipped) == {
        convert.SKIP_MISSING: 3, convert.SKIP_FRAME: 1, convert.SKIP_MISMATCH: 1}


@pytest.mark.parametrize(("reviewed", "location", "length", "want"), [
    (False, "", 300, (60.0, "low")),
    (True, "", 300, (80.0, "medium")),
    (False, "Cytoplasm, cytosol", 75, (65.0, "low")),
    (False, "Cytoplasm; ribosome", 600, (95.0, "medium")),
    (False, "Cell inner membrane", 20, (30.0, "low")),
    (False, "Secreted. Extracellular space", 2000, (35.0, "low")),
    (False, "Cell membrane; secreted", 30, (25.0, "low")),
    (False, "membrane", 1001, (30.0, "low")),
])
def test_the_expression_heuristic(reviewed: bool, location: str, length: int, want: tuple[float, str]) -> None:
    assert convert.estimate_expression(reviewed, location, length) == want


@pytest.mark.parametrize(("organism", "host"), [
    ("Escherichia coli (strain K12)", "E_coli"), ("Homo sapiens (Human)", "Human"), ("Mus musculus (Mouse)", "Mouse"),
    ("Pichia pastoris", "P_pastoris"), ("Komagataella phaffii (Yeast) (Pichia pastoris)", "P_pastoris"),
    ("Saccharomyces cerevisiae (strain ATCC 204508 / S288c) (Baker's yeast)", "S_cerevisiae"),
    ("Escherichia coli O157:H7", "E_coli"), ("Bacillus subtilis", "E_coli"), ("", "E_coli"),
])
def test_the_host_from_the_organism(organism: str, host: str) -> None:
    assert convert.host_of(organism) == host


def test_convert_limit_and_the_progress_file(tsv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    progress_file = tmp_path / "progress.json"
    monkeypatch.setenv("MMANAGER_PROGRESS_FILE", str(progress_file))
    monkeypatch.setattr(streams, "PRINT_EVERY", 100)
    out = tmp_path / "limited.jsonl"
    assert convert.main(["--input", str(tsv), "--output", str(out), "--limit", "250"]) == 0
    assert len(lines(out)) == 250
    progress = json.loads(progress_file.read_text())
    assert set(progress) == {"done", "total", "unit", "rate"}
    # done counts the rows read: the 250 valid ones and the invalid ones among them
    assert progress["done"] == progress["total"] == 252 and progress["unit"] == "records" and progress["rate"] > 0
    printed = capsys.readouterr().out
    assert re.search(r"^Processed \d+ records \(\d+\.\d rec/s, \d+ success, \d+ failed\)$", printed, re.M)
    assert "✓ Parsed 250 valid records" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_tsv_without_the_sequence_columns_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.tsv").write_text("Entry\tOrganism\nP1\tHomo sapiens\n")
    assert convert.main(["--input", str(tmp_path / "bad.tsv"), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "RefSeq_nn, RefSeq_aa" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.tsv"]


def test_features_are_the_references_per_record(jsonl: Path, features_json: Path) -> None:
    records = lines(jsonl)
    elements = json.loads(features_json.read_text())
    assert len(elements) == len(records)
    errors = 0
    for i, (rec, element) in enumerate(zip(records, elements, strict=True)):
        metadata = element["metadata"]
        assert list(metadata) == ["request_id", "processing_time_ms", "service"]
        assert metadata["request_id"] == f"record_{i}" and metadata["service"] == "evo2-enhanced"
        assert type(metadata["processing_time_ms"]) is int  # whole milliseconds, as in the seed
        assert element["task"] == "extract_features"
        if "R" in rec["sequence"]:
            errors += 1
            assert list(element) == ["task", "status", "error", "metadata"] and element["status"] == "error"
            assert re.fullmatch(r"sequence has 'R' at position \d+ \(0-based\); expected DNA \(ACGTN\)", element["error"])
            continue
        assert list(element) == ["task", "status", "output", "metadata"] and element["status"] == "success"
        output = element["output"]
        assert list(output) == OUTPUT_KEYS
        want = kernel_features.reference(rec["sequence"])
        assert output["sequence"] == rec["sequence"]
        assert output["backend"] == "heuristic" and output["model_version"] == "heuristic-v1.0"
        for name in features.OUTPUT_FIELDS:
            assert output[name] == pytest.approx(want[name], abs=1e-9), (i, name)
    assert errors == 1


def test_features_do_not_depend_on_the_batch_size_and_honour_the_limit(jsonl: Path, features_json: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    assert features.main(["--input", str(jsonl), "--output", str(out), "--batch-size", "7", "--limit", "300"]) == 0
    small = json.loads(out.read_text())
    full = json.loads(features_json.read_text())[:300]
    assert len(small) == 300
    for a, b in zip(small, full, strict=True):
        assert a["metadata"]["request_id"] == b["metadata"]["request_id"]
        assert same_output(a.get("output"), b.get("output")), (a.get("output"), b.get("output"))


def same_output(a: Any, b: Any) -> bool:
    """Equal, floats to their last bits or so: a batch of another size pads to another shape, and the CPU's
    matrix kernels then add in another order (a few units in the last place on some processors)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_output(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_output(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_features_of_records_step_1_did_not_write(tmp_path: Path) -> None:
    """A hand-written JSONL (other key order, lower case, a record without a sequence) is read record by record."""
    path = tmp_path / "hand.jsonl"
    path.write_text('{"host": "E_coli", "sequence": "atgaaataa"}\n\n{"sequence": "ATG\\u0041AATAA"}\n'
                    '{"metadata": {}}\n{"sequence": "ATGÄAA"}\n')
    out = tmp_path / "f.json"
    features.extract(path, out)
    elements = json.loads(out.read_text())
    assert [e["status"] for e in elements] == ["success", "success", "error", "error"]
    assert elements[0]["output"]["sequence"] == "ATGAAATAA" and elements[1]["output"]["sequence"] == "ATGAAATAA"
    assert elements[2]["error"] == "sequence is empty"
    assert elements[3]["error"] == "sequence has 'Ä' at position 3 (0-based); expected DNA (ACGTN)"


def test_features_from_the_evo2_service_match_the_kernel(evo2: str, jsonl: Path, features_json: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    assert features.main(["--input", str(jsonl), "--output", str(out), "--limit", "230", "--service", evo2]) == 0
    got = json.loads(out.read_text())
    want = json.loads(features_json.read_text())[:230]
    assert [e["status"] for e in got] == [e["status"] for e in want]
    for a, b in zip(got, want, strict=True):
        if b["status"] == "success":
            assert list(a["output"]) == OUTPUT_KEYS
            for name in features.OUTPUT_FIELDS:
                assert a["output"][name] == pytest.approx(b["output"][name], abs=1e-6)
        else:
            assert a["error"] == b["error"]


def test_the_service_mode_refuses_a_service_without_features(dnabert2: str, jsonl: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.json"
    assert features.main(["--input", str(jsonl), "--output", str(out), "--service", dnabert2]) == 2
    assert "no extract_features task" in capsys.readouterr().err and not out.exists()


def test_a_device_torch_does_not_see_is_refused(jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert features.main(["--input", str(jsonl), "--output", str(tmp_path / "f.json"), "--device", "cuda"]) == 2
    assert "torch sees no GPU" in capsys.readouterr().err and not (tmp_path / "f.json").exists()


def test_the_features_json_is_read_in_any_layout(features_json: Path, tmp_path: Path) -> None:
    elements = json.loads(features_json.read_text())
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(elements, indent=2))
    assert list(streams.read_features(pretty)) == elements == list(streams.read_features(features_json))
    oneline = tmp_path / "oneline.json"
    oneline.write_text(json.dumps(elements))
    assert list(streams.read_features(oneline)) == elements


def test_enhance_replaces_the_expression_and_keeps_the_rest(jsonl: Path, features_json: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "enhanced.jsonl"
    assert enhance.main(["--input", str(jsonl), "--features", str(features_json), "--output", str(out)]) == 0
    before, after = lines(jsonl), lines(out)
    elements = json.loads(features_json.read_text())
    assert len(after) == len(before)
    changes = []
    raw_before, raw_after = jsonl.read_text().splitlines(), out.read_text().splitlines()
    for i, (old, new, element) in enumerate(zip(before, after, elements, strict=True)):
        assert list(new) == RECORD_KEYS
        assert {k: v for k, v in new.items() if k != "expression"} == {k: v for k, v in old.items() if k != "expression"}
        if element["status"] != "success":
            assert raw_after[i] == raw_before[i]
            continue
        f = element["output"]
        expression = new["expression"]
        assert list(expression) == ["value", "unit", "assay", "confidence", "original_value"]
        assert expression["unit"] == "estimated_enhanced" and expression["assay"] == "model_enhanced_heuristic"
        assert expression["original_value"] == old["expression"]["value"]
        factor = enhance.factor(f["avg_confidence"], f["gc_content"], f["codon_entropy"], f["perplexity"])
        assert expression["value"] == round(old["expression"]["value"] * factor, 2)
        level = old["expression"]["confidence"]
        assert expression["confidence"] == (enhance.RAISE[level] if f["avg_confidence"] >= 0.8 else level)
        changes.append(abs(expression["value"] - expression["original_value"]))
    printed = capsys.readouterr().out
    assert f"Total records: {len(before)}\n" in printed
    share = 100 * len(changes) / len(before)
    assert f"Enhanced with Evo2: {len(changes)} ({share:.1f}%)\n" in printed
    assert f"Mean absolute change: {sum(changes) / len(changes):.2f}\n" in printed


@pytest.mark.parametrize(("confidence", "gc", "entropy", "perplexity", "want"), [
    (1.0, 0.51, 6.0, 3.5, 1.32), (0.0, 0.9, 3.0, 5.0, 0.68), (0.5, 0.51, 5.0, 4.0, 1.05),
])
def test_the_enhancement_factor(confidence: float, gc: float, entropy: float, perplexity: float, want: float) -> None:
    assert enhance.factor(confidence, gc, entropy, perplexity) == pytest.approx(want)


def test_enhance_parses_records_of_another_layout_the_same(jsonl: Path, features_json: Path, tmp_path: Path) -> None:
    reordered = tmp_path / "reordered.jsonl"
    records = lines(jsonl)[:50]
    reordered.write_text("".join(json.dumps(dict(reversed(list(r.items())))) + "\n" for r in records))
    fast, slow = tmp_path / "fast.jsonl", tmp_path / "slow.jsonl"
    enhance.enhance(jsonl, features_json, fast, limit=50)
    enhance.enhance(reordered, features_json, slow)
    assert [r["expression"] for r in lines(fast)] == [r["expression"] for r in lines(slow)]
    assert len(lines(fast)) == 50


def test_a_failed_step_leaves_no_output(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), streams.atomic_output(target) as out:
        out.write(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_the_runner_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMANAGER_PROGRESS_FILE", str(tmp_path / "progress.json"))
    tsv = tmp_path / "small.tsv"
    dataset.write(tsv, 500, seed=1)
    result = run.run(tsv, tmp_path / "out")
    printed = capsys.readouterr().out
    for banner in ("MICROSERVICE EXPRESSION ENHANCEMENT PIPELINE", "STEP 1: Converting TSV to JSONL",
                   "STEP 2: Extracting Evo2 Features", "STEP 3: Enhancing Expression Estimates",
                   "PIPELINE COMPLETED SUCCESSFULLY", "✓ Parsed 496 valid records", "Total records: 496",
                   "Enhanced with Evo2: 495 (99.8%)"):
        assert banner in printed
    assert re.search(r"^Total time: \d+\.\d\ds$", printed, re.M)
    assert set(result.seconds) == {"convert", "features", "enhance"}
    assert [p.name for p in result.outputs.values()] == ["small.jsonl", "small_evo2_features.json",
                                                         "small_enhanced.jsonl"]
    enhanced = lines(result.outputs["3_enhance_expression"])
    # the last step's: every record, enhanced or not
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == 496
    assert len(enhanced) == 496 and sum(r["expression"]["unit"] == "estimated_enhanced" for r in enhanced) == 495


def test_a_step_runs_as_a_module_with_a_progress_file(tsv: Path, tmp_path: Path) -> None:
    """What a job runs: ``python -m modelserver.pipeline.<step>``, with ``MMANAGER_PROGRESS_FILE`` set."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MMANAGER_PROGRESS_FILE=str(tmp_path / "progress.json"))
    done = subprocess.run([sys.executable, "-m", "modelserver.pipeline.convert", "--input", str(tsv), "--output",
                           str(tmp_path / "Ec.jsonl"), "--limit", "100"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "✓ Parsed 100 valid records" in done.stdout
    assert len((tmp_path / "Ec.jsonl").read_text().splitlines()) == 100
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["done"] == progress["total"] >= 100 and progress["unit"] == "records"
    assert not math.isnan(progress["rate"])


def test_a_tsv_with_a_byte_order_mark_is_read_and_one_not_in_utf8_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = write_tsv(tmp_path / "plain.tsv", [{"Entry": "P1", "RefSeq_nn": "ATGGCC", "RefSeq_aa": "MA"}])
    (tmp_path / "bom").mkdir()
    marked = tmp_path / "bom" / "plain.tsv"  # the same name: the records name their source file
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert convert.main(["--input", str(marked), "--output", str(tmp_path / "marked.jsonl")]) == 0
    assert lines(tmp_path / "marked.jsonl") == lines(convert_to(plain, tmp_path / "plain.jsonl"))
    latin = tmp_path / "latin1.tsv"
    latin.write_bytes(plain.read_bytes().replace(b"P1", b"P\xe91"))
    assert convert.main(["--input", str(latin), "--output", str(tmp_path / "latin1.jsonl")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "latin1.jsonl").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def convert_to(tsv: Path, out: Path) -> Path:
    convert.convert(tsv, out)
    return out


# A step held mid-output (its first record written, its output still a temporary file) until it is signalled.
_HELD_STEP = """
import signal, sys
from pathlib import Path
from typing import Any
from modelserver.pipeline import convert
records = convert.records

def held(*args, **kwargs):
    it = records(*args, **kwargs)
    yield next(it)
    Path(sys.argv[1]).touch()
    while True:
        signal.pause()

convert.records = held
sys.exit(convert.main(["--input", sys.argv[2], "--output", sys.argv[3]]))
"""


def test_a_step_stopped_by_sigterm_leaves_no_temporary_output(tsv: Path, tmp_path: Path) -> None:
    """A job's timeout or cancel is Docker's SIGTERM: the half-written output must not stay to be collected."""
    out = tmp_path / "outputs"
    out.mkdir()
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    step = subprocess.Popen([sys.executable, "-c", _HELD_STEP, str(ready), str(tsv), str(out / "Ec.jsonl")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: ready.exists() or step.poll() is not None, 60, "the step holding its output", interval=0.05)
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "no temporary output while it works"
        step.terminate()
        assert step.wait(timeout=60) == 128 + 15
    finally:
        if step.poll() is None:
            step.kill()
            step.wait()
    assert list(out.iterdir()) == []
