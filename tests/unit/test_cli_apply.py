"""``mmanager apply``'s plan: the file's spec against the stored one, both normalised by the hub's own models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hub.schemas import ServiceSpec
from mmanager.commands.apply import Change, SpecError, check, load, plan

BASE: dict[str, Any] = {"name": "hello", "image": "mmanager/example-model:latest", "ports": {"5000": None},
                        "resources": {"cpu_limit": 0.5, "memory_limit": "32MB"}, "env": {"MODE": "slow"}}


def stored(**changes: Any) -> dict[str, Any]:
    """A spec as the hub stores it: ServiceSpec's JSON dump."""
    return ServiceSpec.model_validate({**BASE, **changes}).model_dump(mode="json")


def test_the_same_spec_changes_nothing() -> None:
    assert plan(stored(), dict(BASE)).patch == {}


def test_a_spec_naming_only_some_fields_leaves_the_others() -> None:
    assert plan(stored(replicas=3, private=True), {"name": "hello", "env": {"MODE": "slow"}}).changes == []


def test_a_field_this_client_does_not_know_is_left_to_the_hub() -> None:
    assert plan({**stored(), "a_newer_field": 1}, dict(BASE)).patch == {}


def test_sizes_compare_by_what_they_mean() -> None:
    spec = {**BASE, "resources": {"cpu_limit": 0.5, "memory_limit": "32768KB"}, "max_body_size": "10240KB"}
    assert plan(stored(), spec).patch == {}


def test_a_changed_field_is_its_leaf_old_and_new_and_the_patch_its_whole_field() -> None:
    spec = {**BASE, "resources": {"memory_limit": "64MB"}, "env": {"MODE": "fast", "DEBUG": "1"}, "replicas": 2}
    # In the file's order.
    result = plan(stored(), spec)
    assert result.changes == [
        Change("resources.memory_limit", "32MB", "64MB"),
        Change("env.MODE", "slow", "fast"), Change("env.DEBUG", None, "1"),
        Change("replicas", 1, 2),
    ]
    # resources merge field by field as the hub merges them: the CPU limit stays.
    assert result.patch["resources"]["cpu_limit"] == 0.5
    assert result.patch["resources"]["memory_limit"] == "64MB"
    assert result.patch["env"] == {"MODE": "fast", "DEBUG": "1"}
    assert result.patch["replicas"] == 2


def test_a_map_key_left_out_is_removed() -> None:
    result = plan(stored(env={"MODE": "slow", "OLD": "x"}), dict(BASE))
    assert result.changes == [Change("env.OLD", "x", None)]
    assert result.patch == {"env": {"MODE": "slow"}}


def test_null_puts_a_field_back_to_its_default() -> None:
    result = plan(stored(health_check={"port": 5000}, prefetch=True), {**BASE, "health_check": None, "prefetch": None})
    assert result.changes == [Change("health_check", stored(health_check={"port": 5000})["health_check"], None),
                              Change("prefetch", True, False)]
    assert result.patch == {"health_check": None, "prefetch": False}


def test_a_default_given_explicitly_is_no_change() -> None:
    assert plan(stored(), {**BASE, "restart_policy": "unless-stopped", "rate_limit_per_minute": 100}).patch == {}


def test_write_only_fields_are_named_never_compared() -> None:
    spec = {**BASE, "registry_auth": {"username": "u", "password": "p"}}
    result = plan(stored(), spec)
    assert result.patch == {} and result.changes == []
    assert result.write_only == ["registry_auth"]
    assert "registry_auth" not in plan(stored(), {**spec, "replicas": 2}).patch


def test_a_model_file_without_a_mount_is_where_the_hub_put_it() -> None:
    digest = "sha256:" + "a" * 64
    current = stored(models=[{"digest": digest, "mount": "/app/models/weights.bin"}])
    assert plan(current, {**BASE, "models": [{"digest": digest}]}).patch == {}


def test_the_model_type_cannot_change() -> None:
    with pytest.raises(SpecError) as found:
        plan(stored(model="dnabert2"), {**BASE, "model": "lucaone"})
    assert found.value.code == "VALIDATION_ERROR"


def test_a_merged_spec_the_hub_would_refuse_is_refused() -> None:
    with pytest.raises(SpecError, match="cpu_fallback"):
        plan(stored(), {"name": "hello", "cpu_fallback": {"image": "cpu:latest"}})


def test_a_bad_spec_is_one_line_naming_the_field() -> None:
    with pytest.raises(SpecError) as found:
        check({**BASE, "resources": {"memory_limit": "1KB"}}, "spec.yaml")
    assert found.value.code == "VALIDATION_ERROR"
    assert found.value.message.startswith("spec.yaml: service 'hello': resources.memory_limit: ")
    assert "\n" not in found.value.message


def test_load_reads_yaml_documents_lists_and_json(tmp_path: Path) -> None:
    many = tmp_path / "many.yaml"
    many.write_text("name: a\nimage: x\n---\n- {name: b, image: y}\n- {name: c, image: z}\n")
    assert [s["name"] for s in load(many)] == ["a", "b", "c"]
    one = tmp_path / "one.json"
    one.write_text('{"name": "a", "image": "x"}')
    assert load(one) == [{"name": "a", "image": "x"}]


@pytest.mark.parametrize(("text", "code"), [
    ("name: [a", "INVALID_FILE"), ("- 1\n", "VALIDATION_ERROR"), ("", "VALIDATION_ERROR"),
    ("name: a\nimage: x\n---\nname: a\nimage: y\n", "VALIDATION_ERROR"),
])
def test_load_refuses_what_is_no_list_of_specs(tmp_path: Path, text: str, code: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as found:
        load(path)
    assert found.value.code == code


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as found:
        load(tmp_path / "none.yaml")
    assert (found.value.code, found.value.status) == ("INVALID_FILE", 2)
