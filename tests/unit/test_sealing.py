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
