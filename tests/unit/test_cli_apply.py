"""``mmanager apply``'s plan: the file's spec against the stored one, both normalised by the hub's own models."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hub.schemas import ModelTypeOut, ServiceSpec
from mmanager.commands.apply import Change, SpecError, check, load, needs_type, plan

NOW = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)

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


TYPE = ModelTypeOut(name="dnabert2", task="embedding", description="", image="mmanager/dnabert2:1",
                    resources={"memory_limit": "4GB"}, replicas=1, probe=None, ports={"5000": None},
                    health_check=None, environment={"MODEL_ID": "zhihan/dnabert2", "MODE": "fast"}, spec={},
                    created_at=NOW, updated_at=NOW)


def made_from_type(**fields: Any) -> dict[str, Any]:
    """A spec as the hub's create from TYPE stores it (hub.services.catalog.model_spec): the file's env over
    the type's environment, every other field the file gives replacing the type's."""
    env = {**TYPE.environment, **fields.pop("env", {})}
    return stored(image=TYPE.image, model="dnabert2", env=env, **fields)


def test_a_spec_from_a_model_type_keeps_the_types_variables() -> None:
    spec = {"name": "hello", "model": "dnabert2", "env": {"MODE": "slow"}, "resources": {"memory_limit": "32MB"}}
    current = made_from_type(env={"MODE": "slow"})
    assert plan(current, spec, TYPE).patch == {}
    changed = plan(current, {**spec, "env": {"MODE": "slow", "DEBUG": "1"}}, TYPE)
    assert changed.changes == [Change("env.DEBUG", None, "1")]
    # Sent as the hub would store it: the type's variables with the file's.
    assert changed.patch == {"env": {"MODEL_ID": "zhihan/dnabert2", "MODE": "slow", "DEBUG": "1"}}
    # A variable the file leaves out that the type does not give is the file's to remove.
    assert plan(made_from_type(env={"MODE": "slow", "OLD": "x"}), spec, TYPE).changes == [Change("env.OLD", "x", None)]


def test_image_null_with_a_model_type_is_the_types_image() -> None:
    spec = {"name": "hello", "model": "dnabert2", "image": None, "env": {"MODE": "slow"}}
    assert plan(made_from_type(env={"MODE": "slow"}), spec, TYPE).patch == {}


def test_fields_a_type_fills_that_the_file_gives_compare_as_the_files() -> None:
    # resources, ports, health_check, probe, replicas: a create replaces the type's with the file's whole.
    spec = {"name": "hello", "model": "dnabert2", "resources": {"memory_limit": "32MB"}, "ports": {"8080": None},
            "health_check": {"port": 8080}, "replicas": 2}
    current = made_from_type(ports={"8080": None}, health_check={"port": 8080}, replicas=2)
    assert plan(current, spec, TYPE).patch == {}
    assert plan(current, {**spec, "replicas": 3}, TYPE).patch == {"replicas": 3}


def test_the_plan_of_a_spec_from_a_type_needs_the_type() -> None:
    spec = {"name": "hello", "model": "dnabert2", "env": {"MODE": "slow"}}
    assert needs_type(spec) and not needs_type({"name": "hello", "model": "dnabert2", "replicas": 2})
    assert not needs_type({"name": "hello", "env": {}})
    with pytest.raises(ValueError, match="model type"):
        plan(made_from_type(), spec)


def test_a_file_is_read_as_json_values(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: hello\nimage: x\nports: {5000: null}\nlabels: {true: 'yes', 1.5: x}\n")
    [spec] = load(path)
    assert spec["ports"] == {"5000": None} and spec["labels"] == {"true": "yes", "1.5": "x"}
    check(spec, str(path))


@pytest.mark.parametrize(("text", "where"), [
    ("probe: {body: {when: 2026-12-07}}", "spec.yaml: service 'hello': probe.body.when: a YAML date (2026-12-07) "
                                          "is not JSON: quote it to give a string"),
    ("probe: {expect: [1, 2026-12-07 10:00:00]}", "probe.expect[1]: a YAML timestamp"),
    ("labels: {2026-12-07: x}", "labels: a key that is a YAML date"),
    ("replicas: .nan", "replicas: nan is not a JSON number"),
    ("ports: {5000: null, '5000': 1}", "ports: key '5000' is given twice"),
    ("labels: !!set {a}", "labels: a YAML set"),
])
def test_what_json_has_no_value_for_is_refused_in_one_line(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: hello\nimage: x\n{text}\n")
    with pytest.raises(SpecError) as found:
        load(path)
    assert (found.value.code, found.value.status) == ("INVALID_FILE", 2)
    assert where in found.value.message and "\n" not in found.value.message
    assert found.value.message.startswith(f"{path}: service 'hello': ")


def test_a_json_file_with_nan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"name": "hello", "image": "x", "rate_limit_per_minute": NaN}')
    with pytest.raises(SpecError, match="rate_limit_per_minute: nan is not a JSON number"):
        load(path)
