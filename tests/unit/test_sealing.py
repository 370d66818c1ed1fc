"""Sealing with the hub key (hub.sealing) and the hub's key settings (MMANAGER_HUB_KEY, _FILE)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from hub.config import HubSettings
from hub.sealing import Sealer, SealError, parse_key


def test_a_sealed_value_opens_under_its_key_only() -> None:
    key = os.urandom(32)
    sealer = Sealer(key)
    sealed = sealer.seal("s3cret")
    assert "s3cret" not in sealed and sealed.startswith(f"{sealer.key_id}:")
    assert sealer.open(sealed) == "s3cret" and sealer.open(sealer.seal(b"\x00bytes")) == "\x00bytes"
    assert sealer.seal("s3cret") != sealed  # a fresh nonce each time
    with pytest.raises(SealError, match="another hub key"):
        Sealer(os.urandom(32)).open(sealed)
    kid, body = sealed.split(":")
    raw = bytearray(base64.urlsafe_b64decode(body))
    raw[-1] ^= 1
    with pytest.raises(SealError, match="damaged"):
        sealer.open(f"{kid}:{base64.urlsafe_b64encode(bytes(raw)).decode()}")
    with pytest.raises(SealError):
        sealer.open(f"{kid}:not base64!")


def test_a_value_opens_only_with_the_data_it_was_sealed_for() -> None:
    sealer = Sealer(os.urandom(32))
    sealed = sealer.seal("s3cret", b"svc-1\nregistry.example")
    assert sealer.open(sealed, b"svc-1\nregistry.example") == "s3cret"
    for other in (b"", b"svc-2\nregistry.example", b"svc-1\nother.example"):
        with pytest.raises(SealError, match="belongs to something else"):
            sealer.open(sealed, other)
    with pytest.raises(SealError):
        sealer.open(sealer.seal("s3cret"), b"svc-1\nregistry.example")


def test_the_key_is_base64_of_32_bytes_either_alphabet() -> None:
    key = bytes(range(250, 256)) * 5 + b"\xfb\xff"  # bytes whose base64 has + and /
    assert parse_key(base64.b64encode(key).decode()) == key
    assert parse_key(base64.urlsafe_b64encode(key).decode().rstrip("=") + "\n") == key
    for bad, problem in (("abc", "not 32"), ("*" * 44, "not base64"), (base64.b64encode(b"x" * 16).decode(), "16 bytes")):
        with pytest.raises(ValueError, match=problem):
            parse_key(bad)


def test_hub_key_settings(tmp_path: Path) -> None:
    text = base64.b64encode(os.urandom(32)).decode()
    assert HubSettings(dev_mode=True).sealer is None
    assert HubSettings(dev_mode=True, hub_key=text).sealer is not None
    key_file = tmp_path / "hub-key"
    key_file.write_text(text + "\n")
    from_file = HubSettings(dev_mode=True, hub_key_file=key_file).sealer
    assert from_file is not None and from_file.key_id == Sealer(base64.b64decode(text)).key_id
    with pytest.raises(ValidationError, match="not both"):
        HubSettings(dev_mode=True, hub_key=text, hub_key_file=key_file)
    with pytest.raises(ValidationError, match="cannot be read"):
        HubSettings(dev_mode=True, hub_key_file=tmp_path / "missing")
    with pytest.raises(ValidationError) as refused:
        HubSettings(dev_mode=True, hub_key="short-" + "k" * 9)
    assert "short-" not in str(refused.value)  # a refused key is never echoed


def test_registry_credentials_go_only_to_their_service_and_registry(caplog: pytest.LogCaptureFixture) -> None:
    from hub.schemas import RegistryAuthIn
    from hub.services.registry_auth import opened, registry_host, seal

    for image, host in (("python:3.12", "docker.io"), ("lab/model", "docker.io"), ("localhost/m:1", "localhost"),
                        ("127.0.0.1:5000/lab/m:1", "127.0.0.1:5000"), ("Registry.Example/m@sha256:ab", "registry.example"),
                        ("index.docker.io/lab/m", "docker.io"), ("host:5000/m", "host:5000")):
        assert registry_host(image) == host, image
    sealer = Sealer(os.urandom(32))
    auth = RegistryAuthIn(username="lab", password="s3cret")  # type: ignore[arg-type]
    sealed = seal(sealer, auth, "svc-1", "registry.example/lab/m:1")
    assert "s3cret" not in sealed and sealed.startswith("registry.example ")
    found = opened(sealer, sealed, "svc-1", "registry.example/lab/m:2")
    assert found is not None and found.password.get_secret_value() == "s3cret"
    assert opened(sealer, sealed, "svc-1", "other.example/lab/m:1") is None  # another registry: not sent
    assert opened(sealer, sealed, "svc-2", "registry.example/lab/m:1") is None  # another service's row
    # A stored value that opens but is not credentials: logged without its text (a validation error's
    # text quotes its input, the password).
    bad = "registry.example " + sealer.seal('{"username": "lab", "password": "\\ud800hunter2"}',
                                            b"registry_auth\nsvc-1\nregistry.example")
    assert opened(sealer, bad, "svc-1", "registry.example/lab/m:1") is None
    assert "hunter2" not in caplog.text and "not valid credentials" in caplog.text


def test_a_cpu_fallback_on_another_registry_gets_no_credentials() -> None:
    from types import SimpleNamespace

    from hub.models import ServiceModel
    from hub.schemas import RegistryAuthIn, ServiceSpec
    from hub.services.lifecycle.deploy import Deployer
    from hub.services.registry_auth import seal

    sealer = Sealer(os.urandom(32))
    spec = ServiceSpec.model_validate({
        "name": "m", "image": "registry.example/lab/m:gpu", "resources": {"gpu_required": True},
        "health_check": {"port": 5000}, "cpu_fallback": {"image": "mirror.example/lab/m:cpu"}})
    auth = RegistryAuthIn(username="lab", password="s3cret")  # type: ignore[arg-type]
    service = ServiceModel(id="svc-1", registry_auth_sealed=seal(sealer, auth, "svc-1", spec.image))
    deployer = Deployer(SimpleNamespace(settings=SimpleNamespace(sealer=sealer)))  # type: ignore[arg-type]
    on_gpu = deployer.container_config(service, spec, 1, ("0",), "m-1")
    assert on_gpu.image == spec.image and on_gpu.registry_auth is not None
    on_cpu = deployer.container_config(service, spec, 1, (), "m-1")
    assert on_cpu.image == "mirror.example/lab/m:cpu" and on_cpu.registry_auth is None


def test_a_rotation_opens_with_the_previous_key_and_seals_under_the_new() -> None:
    old, new = os.urandom(32), os.urandom(32)
    before = Sealer(old).seal("s3cret", b"svc-1")
    during = Sealer(new, [old])
    assert during.key_id == Sealer(new).key_id and during.previous_ids == [Sealer(old).key_id]
    # Both keys' values open; only the new one seals.
    assert during.open(before, b"svc-1") == "s3cret"
    again = during.reseal(before, b"svc-1")
    assert again is not None and again.startswith(f"{during.key_id}:") and during.reseal(again, b"svc-1") is None
    # Once the previous key is dropped, only what was sealed again opens.
    after = Sealer(new)
    assert after.open(again, b"svc-1") == "s3cret"
    with pytest.raises(SealError, match="another hub key"):
        after.open(before, b"svc-1")
    with pytest.raises(SealError, match="belongs to something else"):
        during.reseal(before, b"svc-2")


def test_previous_hub_keys_come_from_settings(tmp_path: Path) -> None:
    old, older, new = (base64.b64encode(os.urandom(32)).decode() for _ in range(3))
    settings = HubSettings(dev_mode=True, hub_key=new, hub_key_previous=f"{old}, {older}")
    assert settings.sealer is not None
    assert settings.sealer.previous_ids == [Sealer(parse_key(k)).key_id for k in (old, older)]
    listed = tmp_path / "previous"
    listed.write_text(f"{old}\n{older}\n")
    from_file = HubSettings(dev_mode=True, hub_key=new, hub_key_previous_file=listed).sealer
    assert from_file is not None and from_file.previous_ids == settings.sealer.previous_ids
    # A previous key alone (nothing to seal under), a bad one, or both forms: refused, no key echoed.
    for bad in ({"hub_key_previous": old}, {"hub_key": new, "hub_key_previous": "nope"},
                {"hub_key": new, "hub_key_previous": old, "hub_key_previous_file": listed}):
        with pytest.raises(ValidationError) as refused:
            HubSettings(dev_mode=True, **bad)
        assert old not in str(refused.value) and new not in str(refused.value)
