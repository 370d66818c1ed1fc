"""`make demo` as a new user runs it: `mmanager dev` (hub, controller and gateway) comes up, the reference
model types are registered and the dnabert2 model service is deployed from its type, the `curl` of a
prediction through its gateway URL is printed with its answer; Ctrl-C, SIGTERM or SIGHUP (twice, as a closing
terminal may send it) removes it and stops everything, during the start as well."""

from __future__ import annotations

import contextlib
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

from examples.demo import remove_unseen_containers
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


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGHUP, signal.SIGHUP]], ids=["SIGTERM", "SIGHUP twice"])
def test_sigterm_and_sighup_stop_what_the_demo_started_as_ctrl_c_does(
        signals: list[signal.Signals], modelserver_image: str, docker_client: docker.DockerClient,
        tmp_path: Path) -> None:
    demo, lines, port = start_demo(tmp_path)
    dev = None
    try:
        # Once its service runs (no need to wait for the gateway and the prediction: Ctrl-C's test does).
        wait_until(lambda: next((line for line in lines if "service dnabert2 (" in line), None), 120,
                          "the demo's service made")
        dev = _dev_process(port)
        # To the demo alone, as a closing terminal or `kill` sends it: `mmanager dev` runs in a session of its own.
        # A closing terminal often sends two SIGHUPs at once: the second must not cut the cleanup short.
        for signum in signals:
            demo.send_signal(signum)
        code = demo.wait(60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(60)
    _assert_dev_gone(dev, docker_client, lines, "+".join(signum.name for signum in signals))
    assert code == 0, "".join(lines)[-2000:]
    assert_nothing_left(docker_client, port, "".join(lines))


def test_a_signal_while_the_demo_starts_stops_what_it_started(
        modelserver_image: str, docker_client: docker.DockerClient, tmp_path: Path) -> None:
    demo, lines, port = start_demo(tmp_path)
    dev = None
    try:
        # As soon as `mmanager dev` runs: the demo is waiting for its hub to come up.
        dev = wait_until(lambda: _dev_process(port), 60, "`mmanager dev` started", interval=0.05)
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            demo.wait(60)
    output = "".join(lines)
    assert "deploying" not in output, "the signal came after the start: " + output[-2000:]
    _assert_dev_gone(dev, docker_client, lines, "SIGTERM")
    assert code == 0, output[-2000:]
    assert all(port_free(p) for p in (port, port + 1, port + 2, port + 3)), "a demo process still listens"


def _assert_dev_gone(dev: int | None, docker_client: docker.DockerClient, lines: list[str], sent: str) -> None:
    """Not one process of `mmanager dev`'s group (its session: the hub, its controller, HAProxy) is left."""
    assert dev is not None, "`mmanager dev` was not found running"
    try:
        os.killpg(dev, 0)
    except ProcessLookupError:
        return
    os.killpg(dev, signal.SIGINT)  # what the demo should have done
    for container in docker_client.containers.list(
            all=True, filters={"label": f"mmanager.controller=dev-{socket.gethostname()}"}):
        container.remove(force=True)
    pytest.fail(f"`mmanager dev` outlived the demo's {sent}: {''.join(lines)[-2000:]}")


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


def test_the_cleanup_removes_only_its_own_services_containers_made_unseen(
        example_image: str, docker_client: docker.DockerClient) -> None:
    """Interrupted while the service was made, its container may start after the cleanup looked for the
    service: the last step removes that one, and nothing of another service or controller."""
    controller = f"dev-test-{os.getpid()}"
    labels = {"mmanager.managed": "true", "mmanager.controller": controller}
    started = []
    try:
        def run(name: str, **extra: str) -> str:
            container = docker_client.containers.run(example_image, name=f"{name}-{os.getpid()}", detach=True,
                                                     labels={**labels, **extra})
            started.append(container.id)
            return container.id

        ours = run("mm-dnabert2-1234abcd-1-x")
        others = [run("mm-dnabert2-9999ffff-1-x"), run("mm-other-1234abcd-1-x"),
                  run("mm-dnabert2-1234abcd-2-y", **{"mmanager.controller": f"{controller}-2"})]
        remove_unseen_containers(controller, docker_client.containers.get(ours).attrs["Created"][:19],
                                 "1234abcd-rest-of-the-id", deadline=float("inf"))
        left = {c.id for c in docker_client.containers.list(all=True, filters={"label": "mmanager.managed=true"})}
        assert ours not in left
        assert set(others) <= left
    finally:
        for cid in started:
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.containers.get(cid).remove(force=True)
