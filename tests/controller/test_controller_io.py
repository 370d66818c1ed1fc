"""Logs, stats and file copies, on the real Docker engine.

Following logs is tested through a real uvicorn server: httpx's in-process
transport buffers whole responses, so only a socket shows that a stream
flows while the container runs and ends when the client leaves.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import uvicorn

from tests.controller.conftest import AUTH, Ctl
from tests.support.poll import eventually


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cat(docker_client: docker.DockerClient, container_id: str, path: str) -> str:
    result = docker_client.containers.get(container_id).exec_run(["cat", path])
    assert result.exit_code == 0, result.output
    return result.output.decode()


def ls(docker_client: docker.DockerClient, container_id: str, path: str) -> list[str]:
    result = docker_client.containers.get(container_id).exec_run(["ls", "-A", path])
    return sorted(result.output.decode().split()) if result.exit_code == 0 else []


async def running(ctl: Ctl, image: str) -> str:
    response = await ctl.create(image)
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


@pytest.fixture
async def served(ctl: Ctl) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    server = uvicorn.Server(uvicorn.Config(ctl.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", server
    server.should_exit = True
    # A stream that outlived its client would hold the shutdown up.
    await asyncio.wait_for(task, 5)


async def test_logs_as_json(ctl: Ctl, example_image: str) -> None:
    cid = (await ctl.create(example_image, environment={"MODEL_NAME": "dnabert2"})).json()["container_id"]
    async def some_logs() -> dict[str, Any] | None:
        body = (await ctl.client.get(f"/containers/{cid}/logs", params={"lines": 100})).json()
        return body if body["logs"] else None

    body = await eventually(some_logs, 5, "the container's first log lines", interval=0.05)
    assert body["container_id"] == cid
    assert "model service dnabert2 listening on 5000" in body["logs"]
    assert body["lines"] == len(body["logs"].splitlines())
    assert (await ctl.client.get(f"/containers/{cid}/logs", params={"lines": 0})).json()["logs"] == ""


async def test_follow_streams_and_stops_when_the_client_leaves(
    ctl: Ctl, example_image: str, served: tuple[str, uvicorn.Server]
) -> None:
    base, server = served
    cid = await running(ctl, example_image)
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as client:
        async with client.stream("GET", f"/containers/{cid}/logs", params={"follow": "true", "lines": 10}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            received = b""
            async for chunk in response.aiter_bytes():
                received += chunk
                if b"listening on 5000" in received:
                    break
        # The container keeps running: only the client's leaving can end this response.
        await eventually(lambda: not server.server_state.tasks, 5, "the response to end with its client",
                         interval=0.05)
    assert (await ctl.client.get(f"/containers/{cid}")).json()["status"] == "running"


async def test_follow_ends_when_the_container_stops(
    ctl: Ctl, example_image: str, served: tuple[str, uvicorn.Server]
) -> None:
    base, _ = served
    cid = await running(ctl, example_image)
    async with (
        httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as client,
        client.stream("GET", f"/containers/{cid}/logs", params={"follow": "true"}) as response,
    ):

        async def read_all() -> bytes:
            return b"".join([chunk async for chunk in response.aiter_bytes()])

        reader = asyncio.create_task(read_all())
        await asyncio.sleep(0.3)
        assert not reader.done()
        await ctl.client.post(f"/containers/{cid}/stop", params={"timeout": 0})
        assert b"listening on 5000" in await asyncio.wait_for(reader, 5)


async def test_follow_of_an_unknown_container_is_a_json_404(ctl: Ctl) -> None:
    response = await ctl.client.get("/containers/nope/logs", params={"follow": "true"})
    assert (response.status_code, response.json()["error"]["code"]) == (404, "NOT_FOUND")


async def test_stats(ctl: Ctl, example_image: str) -> None:
    cid = (await ctl.create(example_image, memory_limit="64m", ports={"5000": None})).json()
    stats = (await ctl.client.get(f"/containers/{cid['container_id']}/stats")).json()
    assert stats["container_id"] == cid["container_id"] and stats["status"] == "running"
    assert stats["memory_limit"] == 64 * 1024**2 and stats["memory_limit_mb"] == 64
    assert 0 < stats["memory_usage"] < stats["memory_limit"]
    assert 0 < stats["memory_percent"] < 100
    assert stats["cpu_percent"] >= 0 and stats["online_cpus"] >= 1
    assert stats["pids"] >= 1
    for key in ("network_rx_bytes", "network_tx_bytes", "block_read_bytes", "block_write_bytes"):
        assert stats[key] >= 0


async def test_copy_a_file(ctl: Ctl, example_image: str, docker_client: docker.DockerClient) -> None:
    cid = await running(ctl, example_image)
    # As GeoML-Hub sends it: the full target path, its base name as file_name.
    geoml = {"container_path": "/app/gogogo.py", "content_base64": b64(b"print('hi')\n"), "file_name": "gogogo.py"}
    response = await ctl.client.post(f"/containers/{cid}/files", json={**geoml, "is_directory": False})
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True and response.json()["path"] == "/app/gogogo.py"
    assert cat(docker_client, cid, "/app/gogogo.py") == "print('hi')\n"

    into_folder = {
        "container_path": "/app/conf",
        "content_base64": b64(b"{}"),
        "file_name": "mc.json",
        "is_directory": True,
    }
    assert (await ctl.client.post(f"/containers/{cid}/files", json=into_folder)).json()["path"] == "/app/conf/mc.json"
    assert cat(docker_client, cid, "/app/conf/mc.json") == "{}"

    bad = await ctl.client.post(f"/containers/{cid}/files", json={**geoml, "content_base64": "%%%"})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "VALIDATION_ERROR")
    relative = await ctl.client.post(f"/containers/{cid}/files", json={**geoml, "container_path": "app/x"})
    assert relative.status_code == 422


def geoml_tar(tmp_path: Path, files: dict[str, bytes], folder: str = "model") -> bytes:
    """What GeoML-Hub makes: tar.add(directory, arcname=basename(directory))."""
    root = tmp_path / folder
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=root.name)
    return buf.getvalue()


async def test_copy_a_directory(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    cid = await running(ctl, example_image)
    old = {"container_path": "/app/model/old.bin", "content_base64": b64(b"old")}
    await ctl.client.post(f"/containers/{cid}/files", json=old)

    archive = geoml_tar(tmp_path, {"weights.bin": b"\x00\x01", "sub/config.json": b'{"a": 1}'}, folder="extract_model")
    body = {"container_path": "/app/model", "archive_base64": b64(archive), "remove_existing": True}
    response = await ctl.client.post(f"/containers/{cid}/directories", json=body)
    assert response.status_code == 200, response.text
    assert (response.json()["success"], response.json()["files"]) == (True, 2)
    assert ls(docker_client, cid, "/app/model") == ["sub", "weights.bin"]
    assert cat(docker_client, cid, "/app/model/sub/config.json") == '{"a": 1}'

    # A zip of loose files, added next to what is there.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("one.csv", "a,b\n")
        zf.writestr("two.csv", "c,d\n")
    body = {"container_path": "/app/model", "archive_base64": b64(buf.getvalue()), "remove_existing": False}
    assert (await ctl.client.post(f"/containers/{cid}/directories", json=body)).json()["files"] == 2
    assert ls(docker_client, cid, "/app/model") == ["one.csv", "sub", "two.csv", "weights.bin"]

    junk = {"container_path": "/app/model", "archive_base64": b64(b"not an archive"), "remove_existing": True}
    refused = await ctl.client.post(f"/containers/{cid}/directories", json=junk)
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "VALIDATION_ERROR")
    assert "weights.bin" in ls(docker_client, cid, "/app/model")

    root = {"container_path": "/", "archive_base64": b64(archive), "remove_existing": True}
    assert (await ctl.client.post(f"/containers/{cid}/directories", json=root)).status_code == 422

    await ctl.client.post(f"/containers/{cid}/stop", params={"timeout": 0})
    body = {"container_path": "/app/model", "archive_base64": b64(archive), "remove_existing": True}
    stopped = await ctl.client.post(f"/containers/{cid}/directories", json=body)
    assert (stopped.status_code, stopped.json()["error"]["code"]) == (409, "CONTAINER_NOT_RUNNING")
