"""`make demo` as a new user runs it: `mmanager dev` (hub, controller and gateway) comes up, the example
service is deployed, its gateway URL is printed and answers; Ctrl-C removes it and stops everything."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import docker
import httpx

from tests.support.net import free_port, port_free
from tests.support.poll import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_prints_a_gateway_url_that_answers(example_image: str, docker_client: docker.DockerClient,
                                                    tmp_path: Path) -> None:
    port = free_port()
    while not all(port_free(p) for p in (port + 1, port + 2, port + 3)):
        port = free_port()
    env = {**os.environ, "MMANAGER_DEMO_PORT": str(port), "PYTHONPATH": str(ROOT)}
    demo = subprocess.Popen([sys.executable, "-m", "examples.demo"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        said = wait_until(lambda: next((line for line in lines if "answers" in line), None), 90,
                          "the demo saying where the service answers")
        url = re.search(r"gateway URL (\S+) answers", said)
        assert url is not None, said
        assert url.group(1) == f"http://127.0.0.1:{port + 2}/s/dev/example/"
        answer = httpx.get(url.group(1) + "health", timeout=5)
        assert answer.status_code == 200 and answer.json() == {"status": "healthy"}
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(60)
    output = "".join(lines)
    assert "removing the example service" in output, output[-2000:]
    left = docker_client.containers.list(all=True, filters={"label": f"mmanager.controller=dev-{socket.gethostname()}"})
    assert left == [], [c.name for c in left]
    # Nothing of it is left listening: the hub, the controller, the gateway and its HAProxy are gone.
    assert all(port_free(p) for p in (port, port + 1, port + 2, port + 3)), "a demo process still listens"
