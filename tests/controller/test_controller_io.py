"""Logs, stats and file copies, on the real Docker engine.

Following logs is tested through a real uvicorn server: httpx's in-process
transport buffers whole responses, so only a socket shows that a stream
flows while the container runs and ends when the client leaves.
"""

from __future__ import annotations

import asyncio
import base64
import io
import posixpath
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
    # The cumulative counters behind cpu_percent: two answers give the CPU use between them.
    assert stats["cpu_usage_ns"] > 0 and stats["system_cpu_usage_ns"] > stats["cpu_usage_ns"]
    assert stats["pids"] >= 1
    for key in ("network_rx_bytes", "network_tx_bytes", "block_read_bytes", "block_write_bytes"):
        assert stats[key] >= 0
    # The run they count: restarted in place (the same id), it is another start, its counters afresh.
    assert stats["started_at"] > "2000"
    r = await ctl.client.post(f"/containers/{cid['container_id']}/restart", params={"timeout": 2})
    assert r.status_code == 200, r.text
    again = (await ctl.client.get(f"/containers/{cid['container_id']}/stats")).json()
    assert again["container_id"] == stats["container_id"] and again["started_at"] > stats["started_at"]


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


async def copy(ctl: Ctl, cid: str, path: str, content: bytes, name: str | None = None, **extra: Any) -> httpx.Response:
    body = {"container_path": path, "content_base64": b64(content), **extra}
    if name is not None:
        body["file_name"] = name
    return await ctl.client.post(f"/containers/{cid}/files", json=body)


def read_file(docker_client: docker.DockerClient, container_id: str, path: str) -> bytes:
    """The file's bytes through Docker's archive API: a stopped container too."""
    stream, _ = docker_client.containers.get(container_id).get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.extractfile(tar.getmembers()[0])
        assert member is not None
        return member.read()


async def test_a_file_lands_as_docker_cp_lands_it(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    cid = await running(ctl, example_image)
    # A new path, GeoML-Hub's way (whole path, its base name): created, folders and all.
    created = await copy(ctl, cid, "/app/data/keep.csv", b"keep", "keep.csv")
    assert (created.status_code, created.json()["path"]) == (200, "/app/data/keep.csv"), created.text
    # An existing folder and a file name: the file goes inside, the folder and its files stay.
    inside = await copy(ctl, cid, "/app/data", b"inside", "x.csv")
    assert (inside.status_code, inside.json()["path"]) == (200, "/app/data/x.csv"), inside.text
    assert ls(docker_client, cid, "/app/data") == ["keep.csv", "x.csv"]
    assert cat(docker_client, cid, "/app/data/keep.csv") == "keep"
    # An existing file: overwritten.
    again = await copy(ctl, cid, "/app/data/x.csv", b"newer", "x.csv")
    assert (again.status_code, again.json()["path"]) == (200, "/app/data/x.csv")
    assert cat(docker_client, cid, "/app/data/x.csv") == "newer"
    # A link to a folder is followed, as docker cp follows it.
    assert docker_client.containers.get(cid).exec_run(["ln", "-s", "/app/data", "/app/link"]).exit_code == 0
    linked = await copy(ctl, cid, "/app/link", b"linked", "l.csv")
    assert (linked.status_code, linked.json()["path"]) == (200, "/app/data/l.csv"), linked.text
    assert cat(docker_client, cid, "/app/data/l.csv") == "linked"


async def test_a_file_copy_never_replaces_what_it_did_not_name(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    cid = await running(ctl, example_image)
    await copy(ctl, cid, "/app/data/keep.csv", b"keep")
    # A folder with no file name to write inside it.
    nameless = await copy(ctl, cid, "/app/data", b"x")
    assert (nameless.status_code, nameless.json()["error"]["code"]) == (409, "PATH_IS_DIRECTORY")
    # The file inside a folder would itself be a folder.
    onto_folder = await copy(ctl, cid, "/app", b"x", "data", is_directory=True)
    assert (onto_folder.status_code, onto_folder.json()["error"]["code"]) == (409, "PATH_IS_DIRECTORY")
    # A file where the path needs a folder: one copied in, and one of the image's own (Docker alone would
    # turn busybox, the image's every command, into a folder).
    for path in ("/app/data/keep.csv/y.csv", "/bin/busybox/y"):
        under_file = await copy(ctl, cid, path, b"x", posixpath.basename(path))
        assert (under_file.status_code, under_file.json()["error"]["code"]) == (409, "PATH_CONFLICT"), path
    assert ls(docker_client, cid, "/app/data") == ["keep.csv"]
    assert cat(docker_client, cid, "/app/data/keep.csv") == "keep"
    assert docker_client.containers.get(cid).exec_run(["busybox", "true"]).exit_code == 0


async def test_a_file_copy_into_a_stopped_container(
    ctl: Ctl, example_image: str, docker_client: docker.DockerClient
) -> None:
    cid = await running(ctl, example_image)
    await copy(ctl, cid, "/app/data/keep.csv", b"keep")
    await ctl.client.post(f"/containers/{cid}/stop", params={"timeout": 0})
    inside = await copy(ctl, cid, "/app/data", b"late", "late.csv")
    assert (inside.status_code, inside.json()["path"]) == (200, "/app/data/late.csv"), inside.text
    new = await copy(ctl, cid, "/app/new/n.csv", b"new", "n.csv")
    assert (new.status_code, new.json()["path"]) == (200, "/app/new/n.csv"), new.text
    assert (await copy(ctl, cid, "/app/data", b"x")).json()["error"]["code"] == "PATH_IS_DIRECTORY"
    assert docker_client.containers.get(cid).status == "exited"
    assert read_file(docker_client, cid, "/app/data/late.csv") == b"late"
    assert read_file(docker_client, cid, "/app/data/keep.csv") == b"keep"
    assert read_file(docker_client, cid, "/app/new/n.csv") == b"new"


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

    # A merge never turns a file into a folder or a folder into a file.
    for clash in ({"weights.bin/inner.txt": b"x"}, {"sub": b"a file where a folder is"}):
        body = {"container_path": "/app/model", "archive_base64": b64(geoml_tar(tmp_path / str(len(clash)) / next(
            iter(clash)).replace("/", "_"), clash)), "remove_existing": False}
        refused = await ctl.client.post(f"/containers/{cid}/directories", json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (409, "PATH_CONFLICT"), clash
    assert ls(docker_client, cid, "/app/model") == ["one.csv", "sub", "two.csv", "weights.bin"]
    assert cat(docker_client, cid, "/app/model/weights.bin") == "\x00\x01"
    assert ls(docker_client, cid, "/app/model/sub") == ["config.json"]

    # A folder-heavy archive (400 folders, most of them new): a file deep under an existing folder is still
    # found, and without one the merge goes through.
    heavy = {f"t{i}/a/b/c/leaf.txt": b"x" for i in range(100)}
    clash = geoml_tar(tmp_path / "heavy-clash", {**heavy, "sub/config.json/inner.txt": b"x"})
    body = {"container_path": "/app/model", "archive_base64": b64(clash), "remove_existing": False}
    refused = await ctl.client.post(f"/containers/{cid}/directories", json=body)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "PATH_CONFLICT")
    assert refused.json()["error"]["details"]["path"] == "/app/model/sub/config.json"
    body["archive_base64"] = b64(geoml_tar(tmp_path / "heavy", {**heavy, "sub/more.txt": b"m"}))
    assert (await ctl.client.post(f"/containers/{cid}/directories", json=body)).json()["files"] == 101
    assert ls(docker_client, cid, "/app/model/sub") == ["config.json", "more.txt"]
    assert cat(docker_client, cid, "/app/model/t99/a/b/c/leaf.txt") == "x"
    assert cat(docker_client, cid, "/app/model/sub/config.json") == '{"a": 1}'

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
