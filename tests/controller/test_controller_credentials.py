"""The controller's keys: weak ones refused outside dev mode, the hub's next key
accepted during its rotation, and the heartbeat key file picked up when an
operator rewrites it, with no heartbeat failing for it."""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

import pytest

from controller.config import ControllerSettings
from tests.controller.conftest import KEY, StartController
from tests.controller.test_controller_heartbeat import HUB, FakeHub
from tests.support.poll import eventually

KEY_ENV = ("MMANAGER_API_KEY", "MMANAGER_API_KEY_NEXT", "MMANAGER_CONTROLLER_KEY", "MMANAGER_CONTROLLER_KEY_FILE",
           "MMANAGER_DEV", "MMANAGER_DEV_MODE", "SERVER_ID")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVER_ID", "ctl-keys")
    return monkeypatch


def mint() -> str:
    return "mmc_" + secrets.token_urlsafe(32)


def write_key(path: Path, key: str) -> None:
    """As the docs tell operators: write a new file, then rename it over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(key + "\n")
    os.replace(tmp, path)


def failures_metric(text: str) -> float:
    found = re.search(r"^mmanager_heartbeat_failures_total\{[^}]*\} (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


@pytest.mark.parametrize("name", ["MMANAGER_API_KEY", "MMANAGER_API_KEY_NEXT", "MMANAGER_CONTROLLER_KEY", "file"])
@pytest.mark.parametrize("weak", ["mmanager-secure-key-12345", "changeme", "short-key"])
def test_weak_keys_are_refused_outside_dev_mode(env: pytest.MonkeyPatch, tmp_path: Path, name: str,
                                                weak: str) -> None:
    env.setenv("MMANAGER_API_KEY", KEY)
    if name == "file":
        (tmp_path / "key").write_text(weak + "\n")
        env.setenv("MMANAGER_CONTROLLER_KEY_FILE", str(tmp_path / "key"))
    else:
        env.setenv(name, weak)
    with pytest.raises(ValueError, match="unfit") as refused:
        ControllerSettings(_env_file=None)
    assert weak not in str(refused.value)
    env.setenv("MMANAGER_DEV", "true")
    ControllerSettings(_env_file=None)


def test_key_settings_that_cannot_work_are_refused(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("MMANAGER_API_KEY", KEY)
    settings = ControllerSettings(_env_file=None)
    assert (settings.api_key_next, settings.controller_key, settings.controller_key_file, settings.dev_mode) == (
        None, None, None, False)
    env.setenv("MMANAGER_CONTROLLER_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot be read"):
        ControllerSettings(_env_file=None)
    (tmp_path / "empty").write_text("\n")
    env.setenv("MMANAGER_CONTROLLER_KEY_FILE", str(tmp_path / "empty"))
    env.setenv("MMANAGER_DEV", "true")
    with pytest.raises(ValueError, match="empty"):
        ControllerSettings(_env_file=None)
    write_key(tmp_path / "key", mint())
    env.setenv("MMANAGER_CONTROLLER_KEY_FILE", str(tmp_path / "key"))
    env.setenv("MMANAGER_CONTROLLER_KEY", mint())
    with pytest.raises(ValueError, match="not both"):
        ControllerSettings(_env_file=None)


async def test_the_hub_key_and_its_next_one_are_accepted_during_a_rotation(start_fake: StartController) -> None:
    following = "hub-next-key-" + secrets.token_hex(16)
    ctl = await start_fake(api_key_next=following)
    for key, status in ((KEY, 200), (following, 200), (following + "x", 401), (mint(), 401)):
        r = await ctl.client.get("/containers", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == status, (key, r.text)
    plain = await start_fake(server_id="ctl-plain")
    assert (await plain.client.get("/containers", headers={"Authorization": f"Bearer {following}"})).status_code == 401


async def test_a_rewritten_key_file_switches_the_heartbeats_without_a_failure(
        start_fake: StartController, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="controller")
    path = tmp_path / "controller.key"
    old, new = mint(), mint()
    write_key(path, old)
    hub = FakeHub()
    ctl = await start_fake(hub_transport=hub.transport(), hub_url=HUB, controller_url="http://ctl.test:8001",
                           controller_key_file=path)

    def keys() -> list[str]:
        return [r.headers["authorization"].removeprefix("Bearer ") for r in hub.requests]

    await eventually(lambda: len(hub.requests) >= 3, what="three heartbeats")
    assert set(keys()) == {old}
    write_key(path, new)
    await eventually(lambda: keys()[-3:] == [new] * 3, what="three heartbeats with the new key")
    # A file left empty or unreadable mid-rotation keeps the last good key.
    path.write_text("")
    count = len(hub.requests)
    await eventually(lambda: len(hub.requests) >= count + 3, what="three more heartbeats")
    path.unlink()
    count = len(hub.requests)
    await eventually(lambda: len(hub.requests) >= count + 3, what="three more heartbeats")
    assert set(keys()[keys().index(new):]) == {new}

    agent = ctl.app.state.heartbeat
    assert agent.failures == 0
    assert failures_metric((await ctl.client.get("/metrics")).text) == 0
    assert old not in caplog.text and new not in caplog.text
    assert "heartbeats go on with the previous key" in caplog.text

    # The counter does count: a hub that refuses the key.
    hub.mode = "unauthorized"
    await eventually(lambda: agent.failures >= 2, what="two refused heartbeats")
    assert failures_metric((await ctl.client.get("/metrics")).text) >= 2
