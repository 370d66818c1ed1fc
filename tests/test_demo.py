"""`make demo` as a new user runs it: `mmanager dev` (hub, controller and gateway) comes up, the reference
model types are registered and the dnabert2 model service is deployed from its type, the `curl` of a
prediction through its gateway URL is printed with its answer; Ctrl-C, SIGTERM or SIGHUP removes it and stops
everything."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import docker
import pytest

from tests.support.net import free_port, port_free
from tests.support.poll import wait_until

ROOT = Path(__file__).resolve().parents[1]


def start_demo(cwd: Path) -> tuple[subprocess.Popen[str], list[str], int]:
    """`make demo`'s script on free ports, in a session of its own; its output's lines as they come."""
    port = free_port()
    while not all(port_free(p) for p in (port + 1, port + 2, port + 3)):
        port = free_port()
    env = {**os.environ, "MMANAGER_DEMO_PORT": str(port), "PYTHONPATH": str(ROOT)}
    demo = subprocess.Popen([sys.executable, "-m", "examples.demo"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    return demo, lines, port


def assert_nothing_left(docker_client: docker.DockerClient, port: int, output: str) -> None:
    assert "removing the dnabert2 service" in output, output[-2000:]
    left = docker_client.containers.list(all=True, filters={"label": f"mmanager.controller=dev-{socket.gethostname()}"})
    assert left == [], [c.name for c in left]
    # Nothing of it is left listening: the hub, the controller, the gateway and its HAProxy are gone.
    assert all(port_free(p) for p in (port, port + 1, port + 2, port + 3)), "a demo process still listens"


def test_the_demo_prints_a_prediction_through_the_gateway(modelserver_image: str, docker_client: docker.DockerClient,
                                                         tmp_path: Path) -> None:
    demo, lines, port = start_demo(tmp_path)
    try:
        said = wait_until(lambda: next((line for line in lines if "answers" in line), None), 120,
                          "the demo saying where the service answers")
        url = re.search(r"gateway URL (\S+) answers", said)
        assert url is not None, said
        assert url.group(1) == f"http://127.0.0.1:{port + 2}/s/dev/dnabert2/"
        printed = wait_until(lambda: _printed_answer(lines), 10, "the printed curl and its answer")
        # The printed curl, run as a user would copy it, gives the printed answer (but its request id and time).
        curl = subprocess.run(printed[0][2:], shell=True, capture_output=True, text=True, timeout=30)
        again = json.loads(curl.stdout)
        assert again["success"] is True and printed[1]["success"] is True
        assert again["data"]["prediction"] == printed[1]["data"]["prediction"]
        assert 0 <= again["data"]["prediction"] <= 1 and again["data"]["details"]["class"] in ("promoter", "non_promoter")
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(60)
    assert_nothing_left(docker_client, port, "".join(lines))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_what_the_demo_started_as_ctrl_c_does(
        signum: signal.Signals, modelserver_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    demo, lines, port = start_demo(tmp_path)
    dev = None
    try:
        # Once its service runs (no need to wait for the gateway and the prediction: Ctrl-C's test does).
        wait_until(lambda: next((line for line in lines if "service dnabert2 (" in line), None), 120,
                          "the demo's service made")
        dev = _dev_process(port)
        # To the demo alone, as a closing terminal or `kill` sends it: `mmanager dev` runs in a session of its own.
        demo.send_signal(signum)
        code = demo.wait(60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(60)
    assert dev is not None, "`mmanager dev` was not found running"
    # Not one process of `mmanager dev`'s group (its session: the hub, its controller, HAProxy) is left.
    try:
        os.killpg(dev, 0)
    except ProcessLookupError:
        pass
    else:
        os.killpg(dev, signal.SIGINT)  # what the demo should have done
        for container in docker_client.containers.list(
                all=True, filters={"label": f"mmanager.controller=dev-{socket.gethostname()}"}):
            container.remove(force=True)
        pytest.fail(f"`mmanager dev` outlived the demo's {signum.name}: {''.join(lines)[-2000:]}")
    assert code == 0, "".join(lines)[-2000:]
    assert_nothing_left(docker_client, port, "".join(lines))


def _dev_process(port: int) -> int | None:
    """The pid of the demo's `mmanager dev` (the leader of its own session and process group)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mmanager.cli" in argv and b"dev" in argv and str(port).encode() in argv:
                return int(entry.name)
    return None


def _printed_answer(lines: list[str]) -> tuple[str, dict] | None:
    """The ``$ curl …`` line and the JSON answer printed under it, once all of it is printed."""
    text = "".join(lines)
    start = text.find("$ curl ")
    if start < 0:
        return None
    command, _, rest = text[start:].partition("\n")
    try:
        answer, _ = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        return None
    return command, answer
