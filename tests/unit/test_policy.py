"""mmanager.policy on its own: the rules, the image allow-list and host paths with symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmanager.policy import (
    ALLOWED_CAPABILITIES,
    PolicyViolation,
    SpecPolicy,
    check_capabilities,
    check_spec,
    comma_list,
    environment_problem,
    image_allowed,
    normalise_image,
    volume_source,
)


@pytest.mark.parametrize(
    ("reference", "normalised"),
    [
        ("python", "docker.io/library/python"),
        ("python:3.12", "docker.io/library/python:3.12"),
        ("lab/model:1", "docker.io/lab/model:1"),
        ("index.docker.io/lab/model", "docker.io/lab/model"),
        ("ghcr.io/lab/model@sha256:ab", "ghcr.io/lab/model@sha256:ab"),
        ("localhost:5000/model", "localhost:5000/model"),
        ("localhost/model", "localhost/model"),
    ],
)
def test_image_references_are_read_like_docker(reference: str, normalised: str) -> None:
    assert normalise_image(reference) == normalised


@pytest.mark.parametrize(
    ("allowed", "image", "ok"),
    [
        ([], "anything/at:all", True),
        (["ghcr.io/lab"], "ghcr.io/lab/model:1", True),
        (["ghcr.io/lab"], "ghcr.io/lab:2", True),
        (["ghcr.io/lab"], "ghcr.io/lab-evil/model:1", False),
        (["ghcr.io/lab"], "ghcr.io/other/model:1", False),
        (["ghcr.io/lab"], "lab/model", False),
        (["registry.example.org"], "registry.example.org/any/thing:1", True),
        (["registry.example.org"], "registry.example.org.evil.com/x", False),
        (["python"], "python:3.12", True),
        (["python"], "docker.io/library/python", True),
        (["python"], "pythonista/x", False),
        (["python:3.12"], "python:3.12-slim", False),
        (["docker.io"], "busybox", True),
        (["localhost:5000"], "localhost:5000/model:1", True),
        (["localhost:5000"], "localhost:5001/model:1", False),
        (["mmanager/example-model"], "mmanager/example-model:latest", True),
    ],
)
def test_image_allow_list_matches_whole_components(allowed: list[str], image: str, ok: bool) -> None:
    assert image_allowed(allowed, image) is ok


def test_capabilities_allow_list() -> None:
    assert check_capabilities(["cap_ipc_lock", "CHOWN", "chown"]) == ["CHOWN", "IPC_LOCK"]
    for cap in ("SYS_ADMIN", "ALL", "NET_ADMIN", "SYS_NICE", "SYS_PTRACE", "BPF", "DAC_READ_SEARCH"):
        assert cap not in ALLOWED_CAPABILITIES
        with pytest.raises(PolicyViolation) as refused:
            check_capabilities(["KILL", cap])
        assert refused.value.details == {"field": "cap_add", "rule": "capabilities"}


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({"labels": {"mmanager.epoch": "1"}}, "labels.mmanager.epoch", "reserved_label"),
        ({"network_mode": "host"}, "network_mode", "host_namespace"),
        ({"network_mode": "Container:abc"}, "network_mode", "host_namespace"),
        ({"networks": ["bridge", "host"]}, "networks", "host_namespace"),
        ({"ports": {"5000/tcp": 443}}, "ports.5000/tcp", "low_port"),
        ({"volume_sources": ["/etc"]}, "volumes./etc", "host_path"),
        ({"extra": {"SecurityOpt": ["seccomp=unconfined"]}}, "SecurityOpt", "security_options"),
        ({"extra": {"device-requests": [{"Count": -1}]}}, "device-requests", "devices"),
        ({"extra": {"oom_kill_disable": True}}, "oom_kill_disable", "host_knob"),
    ],
)
def test_refusals_name_field_and_rule(kwargs: dict, field: str, rule: str) -> None:
    with pytest.raises(PolicyViolation) as refused:
        check_spec(SpecPolicy(), image="img", **kwargs)
    assert refused.value.details == {"field": field, "rule": rule}
    assert (refused.value.status_code, refused.value.code) == (403, "SPEC_FORBIDDEN")


def test_what_is_allowed() -> None:
    sources = check_spec(
        SpecPolicy(allowed_low_ports=frozenset({443})),
        image="img",
        labels={"team": "bio"},
        ports={"5000/tcp": None, "8000/tcp": 18000, "443/tcp": 443},
        volume_sources=["models", "cache.v2"],
        cap_add=["IPC_LOCK"],
        network_mode="bridge",
        networks=None,
        extra={"privileged": False, "cap_add": [], "future_field": 1},
    )
    assert sources == {"models": "models", "cache.v2": "cache.v2"}


def test_host_paths_lexically_on_the_hub() -> None:
    policy = SpecPolicy(allowed_host_paths=("/data/shared",))
    assert volume_source(policy, "/data/shared") == "/data/shared"
    assert volume_source(policy, "/data/shared//genomes/") == "/data/shared/genomes"
    for source in ("/data/shared/../secret", "/data/shared-evil", "/data", "data/shared", "/etc"):
        with pytest.raises(PolicyViolation):
            volume_source(policy, source)


def test_host_paths_resolved_on_the_controller(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "inside").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, allowed / "link-out")
    os.symlink(allowed / "inside", tmp_path / "link-in")
    os.symlink(allowed, tmp_path / "allowed-alias")
    resolving = SpecPolicy(allowed_host_paths=(str(allowed),), resolve_paths=True)

    assert volume_source(resolving, str(allowed / "inside")) == str(allowed / "inside")
    # Where a link leads is what is checked, and what Docker will mount.
    assert volume_source(resolving, str(tmp_path / "link-in")) == str(allowed / "inside")
    with pytest.raises(PolicyViolation):
        volume_source(resolving, str(allowed / "link-out"))
    with pytest.raises(PolicyViolation):
        volume_source(resolving, str(allowed / "link-out" / "deeper"))
    # The allow-list entry is resolved too: an admin may name the folder through a link.
    via_alias = SpecPolicy(allowed_host_paths=(str(tmp_path / "allowed-alias"),), resolve_paths=True)
    assert volume_source(via_alias, str(allowed / "inside")) == str(allowed / "inside")
    # Lexically (the hub) the link looks inside: only the controller can tell.
    assert volume_source(SpecPolicy(allowed_host_paths=(str(allowed),)), str(allowed / "link-out")) == str(
        allowed / "link-out"
    )


def test_without_an_allow_list_only_named_volumes() -> None:
    assert volume_source(SpecPolicy(), "models") == "models"
    for source in ("/", "/tmp", "../x", "./x", "a/b"):
        with pytest.raises(PolicyViolation):
            volume_source(SpecPolicy(), source)


def test_environment_bounds_and_comma_lists() -> None:
    assert environment_problem({"A": "1" * 32 * 1024}) is None
    assert environment_problem({"A": "1" * (32 * 1024 + 1)}) is not None
    assert environment_problem({f"V{i}": "" for i in range(257)}) is not None
    assert environment_problem({f"V{i}": "x" * 30_000 for i in range(5)}) is not None
    assert comma_list(" ghcr.io/lab, ,python ") == ["ghcr.io/lab", "python"]
    assert comma_list(["x"]) == ["x"]
