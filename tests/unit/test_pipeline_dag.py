"""A pipeline's graph without a database: the order its steps run in, the cycle that forbids one, the steps
after a failed one, the checks of a spec, a status derived from its steps' and the jobs' specs it becomes."""

from __future__ import annotations

import pytest

from hub.job_schemas import JobOutputInput, PipelineSpec
from hub.scheduler import dag
from hub.services.jobs.pipelines import (
    PipelineCycle,
    StepState,
    UnknownStep,
    check_graph,
    pipeline_status,
    step_job_spec,
    stopped_steps,
)


def test_order_puts_every_step_after_what_it_needs_and_keeps_the_given_order_otherwise() -> None:
    assert dag.topological_order({"a": [], "b": ["a"], "c": ["b"]}) == ["a", "b", "c"]
    assert dag.topological_order({"c": ["b"], "b": ["a"], "a": []}) == ["a", "b", "c"]
    # A diamond: d after b and c, each once.
    assert dag.topological_order({"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": []}) == ["a", "b", "c", "d"]
    # Independent steps stay as given.
    assert dag.topological_order({"x": [], "y": [], "z": []}) == ["x", "y", "z"]


def test_a_cycle_is_found_with_its_path() -> None:
    assert dag.find_cycle({"a": ["c"], "b": ["a"], "c": ["b"]}) == ["a", "c", "b", "a"]
    assert dag.find_cycle({"a": ["a"]}) == ["a", "a"]
    # The cycle alone, not the path that led to it.
    assert dag.find_cycle({"start": ["x"], "x": ["y"], "y": ["x"]}) == ["x", "y", "x"]
    assert dag.find_cycle({"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": []}) is None
    with pytest.raises(dag.CycleError) as raised:
        dag.topological_order({"a": ["b"], "b": ["a"]})
    assert raised.value.path == ["a", "b", "a"]


def test_a_long_chain_needs_no_recursion() -> None:
    chain = {f"s{i}": [f"s{i - 1}"] if i else [] for i in range(5000)}
    assert dag.topological_order(dict(reversed(chain.items()))) == list(chain)
    assert dag.find_cycle({**chain, "s0": ["s4999"]}) is not None


def test_downstream_upstream_and_unknown() -> None:
    graph = {"a": [], "b": ["a"], "c": ["b"], "d": [], "e": ["c", "d"]}
    assert dag.downstream(graph, ["b"]) == {"b", "c", "e"}
    assert dag.downstream(graph, ["d"]) == {"d", "e"}
    assert dag.downstream(graph, []) == set()
    assert dag.upstream(graph, "e") == {"a", "b", "c", "d"}
    assert dag.unknown({"a": ["x"], "b": ["a", "y"]}) == [("a", "x"), ("b", "y")]


def spec(*steps: dict) -> PipelineSpec:
    return PipelineSpec.model_validate({"name": "p", "steps": [{"image": "img", **s} for s in steps]})


def test_check_graph_names_unknown_steps_and_the_cycle() -> None:
    with pytest.raises(UnknownStep) as unknown:
        check_graph(spec({"name": "a", "needs": ["nope"]},
                         {"name": "b", "inputs": [{"step": "ghost", "path": "x"}]}))
    assert unknown.value.status_code == 422
    assert unknown.value.details == [{"step": "a", "needs": "nope"}, {"step": "b", "needs": "ghost"}]
    with pytest.raises(PipelineCycle) as cycle:
        check_graph(spec({"name": "a", "inputs": [{"step": "c", "path": "x"}]}, {"name": "b", "needs": ["a"]},
                         {"name": "c", "needs": ["b"]}))
    assert cycle.value.status_code == 422 and cycle.value.details == {"cycle": ["a", "c", "b", "a"]}
    assert check_graph(spec({"name": "a"}, {"name": "b", "needs": ["a"], "inputs": [{"step": "a", "path": "o"}]})) \
        == {"a": [], "b": ["a"]}


def test_a_step_becomes_a_job_spec_taking_its_steps_outputs_from_their_jobs() -> None:
    artifact = "f" * 32
    s = spec({"name": "tsv", "retries": 2},
             {"name": "features", "needs": ["tsv"],
              "inputs": [{"step": "tsv", "path": "data.jsonl", "as": "in.jsonl"}, artifact,
                         {"step": "tsv", "path": "other.jsonl"}]})
    tsv, features = s.steps
    ids = {"tsv": "a" * 32}
    assert step_job_spec(tsv, {}).retries == 2 and step_job_spec(tsv, {}).name == "tsv"
    job = step_job_spec(features, ids)
    assert job.inputs == [JobOutputInput.model_validate({"job": ids["tsv"], "path": "data.jsonl", "as": "in.jsonl"}),
                          artifact, JobOutputInput(job=ids["tsv"], path="other.jsonl")]
    assert "needs" not in job.model_dump()


def st(name: str, status: str, *needs: str, started: bool = False) -> StepState:
    return StepState(name, status, needs, started)


@pytest.mark.parametrize(("steps", "expected"), [
    ([st("a", "pending"), st("b", "pending", "a")], "pending"),
    ([st("a", "running"), st("b", "pending", "a")], "running"),
    ([st("a", "succeeded"), st("b", "pending", "a")], "running"),
    # Back in the queue after a lost controller or a retry's backoff: it has started before.
    ([st("a", "pending", started=True), st("b", "pending", "a")], "running"),
    ([st("a", "succeeded"), st("b", "succeeded", "a")], "succeeded"),
    ([st("a", "failed"), st("b", "pending", "a")], "failed"),
    ([st("a", "timed_out"), st("b", "cancelled", "a")], "failed"),
    # Another branch still runs: not over yet.
    ([st("a", "failed"), st("b", "running"), st("c", "pending", "a")], "running"),
    ([st("a", "failed"), st("b", "pending")], "running"),
    ([st("a", "cancelled"), st("b", "pending", "a")], "cancelled"),
    ([st("a", "succeeded"), st("b", "cancelled", "a")], "cancelled"),
])
def test_pipeline_status_follows_its_steps(steps: list[StepState], expected: str) -> None:
    assert pipeline_status(steps) == expected


def test_the_steps_stopped_by_a_failure_are_the_pending_ones_after_it() -> None:
    steps = [st("a", "failed"), st("b", "pending", "a"), st("c", "pending", "b"), st("d", "pending"),
             st("e", "succeeded")]
    assert stopped_steps(steps) == {"b", "c"}


def test_the_documented_example_is_a_valid_three_step_chain() -> None:
    import json
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "API.md").read_text()
    start = text.index("## Pipelines\n")
    section = text[start:text.index("\n## ", start)]
    [example] = re.findall(r"```json\n(.*?)```", section, re.S)
    s = PipelineSpec.model_validate(json.loads(example))
    assert check_graph(s) == {"to-jsonl": [], "features": ["to-jsonl"], "enhance": ["features", "to-jsonl"]}
    assert dag.topological_order(check_graph(s)) == ["to-jsonl", "features", "enhance"]
