"""The shipped seed 001 pipeline spec (examples/seed001/pipeline.json): a valid PipelineSpec once the uploaded
TSV's id is put in, whose steps run the pipeline modules with the files the steps pass each other."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from hub.job_schemas import ArtifactInput, PipelineSpec, StepOutputInput

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed001" / "pipeline.json"
PLACEHOLDER = "<the id of the uploaded Ec.tsv>"


def test_the_example_is_a_pipeline_of_the_three_steps() -> None:
    text = EXAMPLE.read_text()
    assert PLACEHOLDER in text
    spec = PipelineSpec.model_validate(json.loads(text.replace(PLACEHOLDER, "ab" * 16)))
    assert [s.name for s in spec.steps] == ["convert", "features", "enhance"]
    outputs: dict[str, set[str]] = {}
    for step in spec.steps:
        assert step.image == "mmanager/modelserver:latest"
        python, flag, module, *args = step.command
        assert (python, flag, module) == ("python", "-m", f"modelserver.pipeline.{step.name}")
        importlib.import_module(module)
        options = dict(zip(args[::2], args[1::2], strict=True))
        mounted = set()
        for ref in step.inputs:
            if isinstance(ref, StepOutputInput):
                assert ref.step in step.needs and ref.path in outputs[ref.step]
                mounted.add(ref.as_ or ref.path)
            else:
                assert isinstance(ref, ArtifactInput) and ref.path == "Ec.tsv"
                mounted.add(ref.path)
        read = {options[o].removeprefix("/inputs/") for o in ("--input", "--features") if o in options}
        assert read == mounted and all(options[o].startswith("/inputs/") for o in ("--input", "--features")
                                       if o in options)
        assert options["--output"].startswith("/outputs/")
        outputs[step.name] = {options["--output"].removeprefix("/outputs/")}
