"""Pieces of the controller without Docker: settings, the create spec, GPU
choice, archives, and the HTTP layer over the in-memory FakeRuntime."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pynvml
import pytest

from controller import app as controller_app
from controller import archives, copies
from controller.config import ControllerSettings, parse_gpu_devices
from controller.containers import ContainerService
from controller.errors import (
    DockerUnavailable,
    GpuUnavailable,
    ImageNotFound,
    ImageNotPresent,
    ImagePullFailed,
    InvalidRequest,
    PathConflict,
    SpecForbidden,
)
from controller.fake import FakeRuntime
from controller.gpu import choose_gpus, detect_gpus
from controller.runtime import DockerRuntime
from controller.schemas import ImageDetail
from controller.spec import ContainerSpec, build_spec
from examples.images import EXAMPLE_IMAGE
from mmanager.serving import Server
from mmanager.wire import ContainerCreate, ContainerInfo, GpuInfo, ImagePulled
from tests.controller.conftest import KEY, Ctl, StartController, make_settings

# -- settings ---------------------------------------------------------------

CONTROLLER_ENV = (
    "MMANAGER_API_KEY", "SERVER_ID", "SERVER_TYPE", "MMANAGER_SERVER_TYPE", "MAX_CONTAINERS",
    "MMANAGER_MAX_CONTAINERS", "LOG_LEVEL", "MMANAGER_LOG_LEVEL", "LOG_FILE", "DOCKER_HOST", "DOCKER_TIMEOUT",
    "MMANAGER_HUB_URL", "CONTROLLER_URL", "PORT", "MMANAGER_PORT", "GPU_DEVICES", "PUBLISH_IP",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in CONTROLLER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_read_the_seed_names_and_their_aliases(clean_env: pytest.MonkeyPatch) -> None:
    monkeypatch = clean_env
    for name, value in {
        "MMANAGER_API_KEY": "secret-key-0123456789abcdef",
        "SERVER_ID": "mmanager-gpu-01",
        "MMANAGER_SERVER_TYPE": "gpu",
        "MMANAGER_PORT": "8002",
        "MMANAGER_MAX_CONTAINERS": "30",
        "MMANAGER_LOG_LEVEL": "debug",
        "DOCKER_TIMEOUT": "15",
        "GPU_DEVICES": "0:A100:81920,1:A100:81920",
        "PUBLISH_IP": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)
    settings = ControllerSettings(_env_file=None)
    assert settings.api_key.get_secret_value() == "secret-key-0123456789abcdef"
    assert "secret-key-0123456789abcdef" not in repr(settings)
    assert (settings.server_id, settings.server_type, settings.port) == ("mmanager-gpu-01", "gpu", 8002)
    assert (settings.max_containers, settings.log_level, settings.docker_timeout) == (30, "DEBUG", 15)
    assert [g.index for g in settings.gpu_devices or []] == ["0", "1"]
    assert settings.controller_url is not None and settings.controller_url.endswith(":8002")

    # The unprefixed names win over the aliases.
    monkeypatch.setenv("SERVER_TYPE", "edge")
    monkeypatch.setenv("MAX_CONTAINERS", "7")
    monkeypatch.setenv("PORT", "9001")
    settings = ControllerSettings(_env_file=None)
    assert (settings.server_type, settings.max_containers, settings.port) == ("edge", 7, 9001)


def test_settings_by_field_name_and_refusals(clean_env: pytest.MonkeyPatch) -> None:
    settings = ControllerSettings(api_key=KEY, server_id="dev", port=8101, _env_file=None)
    assert (settings.server_type, settings.max_containers, settings.gpu_devices) == ("cpu", 100, None)
    assert settings.controller_url.endswith(":8101")
    for bad in (
        {},
        {"api_key": "  "},
        {"api_key": KEY, "server_type": "tpu"},
        {"api_key": KEY, "publish_ip": "nope"},
        {"api_key": KEY, "log_level": "LOUD"},
        {"api_key": KEY, "gpu_devices": "0:A100:lots"},
    ):
        with pytest.raises(ValueError):
            ControllerSettings(_env_file=None, **bad)


def test_gpu_devices_parsing() -> None:
    assert parse_gpu_devices("0:A100:81920, 1:H100") == [
        GpuInfo(index="0", model="A100", memory_mb=81920),
        GpuInfo(index="1", model="H100", memory_mb=0),
    ]
    with pytest.raises(ValueError):
        parse_gpu_devices("0:A:1,0:B:2")


# -- create spec --------------------------------------------------------------


def spec_of(**body: object):
    return build_spec(ContainerCreate(image="img:1", **body), server_id="ctl-1", publish_ip="")


def test_spec_normalises_ports_environment_and_limits() -> None:
    spec = spec_of(
        ports={"5000": None, "7860/tcp": 7860, "53/udp": 0},
        environment=["A=1", "B=x=y"],
        memory_limit="2GB",
        cpu_limit=1.5,
        restart_policy="on-failure:3",
        volumes={"models": "/app/models", "cache": {"bind": "/cache", "mode": "ro"}},
        service_id="svc",
        epoch=4,
        labels={"team": "bio"},
    )
    assert spec.ports == {"5000/tcp": None, "7860/tcp": 7860, "53/udp": None}
    assert spec.environment == {"A": "1", "B": "x=y"}
    assert (spec.mem_limit, spec.nano_cpus) == (2 * 1024**3, 1_500_000_000)
    assert spec.restart_policy == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert spec.volumes == {"models": {"bind": "/app/models", "mode": "rw"}, "cache": {"bind": "/cache", "mode": "ro"}}
    assert spec.labels == {
        "team": "bio",
        "mmanager.managed": "true",
        "mmanager.controller": "ctl-1",
        "mmanager.service": "svc",
        "mmanager.epoch": "4",
    }
    assert spec_of(restart_policy={"Name": "always"}).restart_policy == {"Name": "always", "MaximumRetryCount": 0}
    assert spec_of(memory_limit=512 * 1024**2).mem_limit == 512 * 1024**2


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"labels": {"mmanager.epoch": "9"}}, SpecForbidden),
        ({"volumes": {"/var/run/docker.sock": "/sock"}}, SpecForbidden),
        ({"volumes": {"../up": "/x"}}, SpecForbidden),
        ({"volumes": {"models": "relative/path"}}, InvalidRequest),
        ({"memory_limit": "2 bananas"}, InvalidRequest),
        ({"cpu_limit": 1e300}, InvalidRequest),
        ({"memory_limit": "99999999999999999999g"}, InvalidRequest),
        ({"cpu_limit": float("nan")}, InvalidRequest),
        ({"restart_policy": "always:3"}, InvalidRequest),
        ({"ports": {"70000": None}}, InvalidRequest),
        ({"networks": ["a"], "network_mode": "host"}, InvalidRequest),
        ({"network_mode": "host"}, SpecForbidden),
    ],
)
def test_spec_refusals(body: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        spec_of(**body)


# -- GPUs ----------------------------------------------------------------------


def test_gpu_choice() -> None:
    inventory = parse_gpu_devices("0:A100:1,1:A100:1,2:A100:1")
    assert choose_gpus(inventory, {"0"}, 2, None) == ["1", "2"]
    assert choose_gpus(inventory, {"0"}, 1, ["2"]) == ["2"]
    with pytest.raises(GpuUnavailable):
        choose_gpus(inventory, {"0", "1"}, 2, None)
    with pytest.raises(GpuUnavailable):
        choose_gpus([], set(), 1, None)
    with pytest.raises(InvalidRequest):
        choose_gpus(inventory, set(), 2, ["0"])


def test_gpu_detection_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect_gpus([GpuInfo(index="3", model="T4")]) == [GpuInfo(index="3", model="T4")]
    calls: list[str] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: [b"NVIDIA H100", "NVIDIA A100"][h])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: type("M", (), {"total": 80 * 1024**3})())
    assert detect_gpus(None) == [
        GpuInfo(index="0", model="NVIDIA H100", memory_mb=81920),
        GpuInfo(index="1", model="NVIDIA A100", memory_mb=81920),
    ]
    assert calls == ["init", "shutdown"]

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert detect_gpus(None) == []


# -- archives ------------------------------------------------------------------


def tar_of(entries: dict[str, bytes | None], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def names_in(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return sorted(m.name for m in tar.getmembers())


def test_directory_archive_unwraps_one_top_folder_whatever_its_name() -> None:
    wrapped = tar_of({"extract_model": None, "extract_model/w.bin": b"1", "extract_model/sub/c.json": b"{}"})
    data, files, folders = archives.directory_archive("/app/model", wrapped)
    assert (files, folders) == (2, ["sub"])
    assert names_in(data) == ["app/model", "app/model/sub/c.json", "app/model/w.bin"]

    loose, files, _ = archives.directory_archive("/app/examples", tar_of({"a.csv": b"1", "b.csv": b"2"}, "w:gz"))
    assert (names_in(loose), files) == (["app/examples", "app/examples/a.csv", "app/examples/b.csv"], 2)

    single, _, _ = archives.directory_archive("/app/x", tar_of({"only.txt": b"1"}))
    assert names_in(single) == ["app/x", "app/x/only.txt"]

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/", "")
        zf.writestr("model/w.bin", "1")
    zipped, files, _ = archives.directory_archive("/app/model", buf.getvalue())
    assert (names_in(zipped), files) == (["app/model", "app/model/w.bin"], 1)


def test_hard_links_become_copies() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        original = tarfile.TarInfo("m/a.bin")
        original.size = 3
        tar.addfile(original, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("m/b.bin")
        link.type, link.linkname = tarfile.LNKTYPE, "m/a.bin"
        tar.addfile(link)
    data, files, _ = archives.directory_archive("/app/m", buf.getvalue())
    assert files == 2
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        copy = tar.extractfile("app/m/b.bin")
        assert copy is not None and copy.read() == b"abc"


def test_archive_paths_cannot_climb_out_of_the_target() -> None:
    data, _, _ = archives.directory_archive("/app/model", tar_of({"../../etc/passwd": b"x", "/abs/f": b"y"}))
    assert names_in(data) == ["app/model", "app/model/abs/f", "app/model/etc/passwd"]
    with pytest.raises(InvalidRequest):
        archives.directory_archive("/app/model", b"neither tar nor zip")
    with pytest.raises(InvalidRequest):
        archives.container_path("/../")
    assert archives.container_path("/app/./model/../model/") == "/app/model"
    with pytest.raises(InvalidRequest):
        archives.decode_base64("not base64!", "content_base64")


# -- HTTP layer over the fake runtime -------------------------------------------


async def test_errors_use_the_envelope_everywhere(fake_ctl: Ctl) -> None:
    unknown_route = await fake_ctl.client.get("/nowhere")
    assert (unknown_route.status_code, unknown_route.json()["error"]["code"]) == (404, "NOT_FOUND")
    wrong_method = await fake_ctl.client.put("/containers")
    assert (wrong_method.status_code, wrong_method.json()["error"]["code"]) == (405, "METHOD_NOT_ALLOWED")
    invalid = await fake_ctl.client.post("/containers", json={"image": 5, "gpu_count": -1})
    assert invalid.status_code == 422
    error = invalid.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert {tuple(d["loc"]) for d in error["details"]} == {("body", "image"), ("body", "gpu_count")}


async def test_concurrent_duplicates_are_created_once(fake_ctl: Ctl, fake: FakeRuntime) -> None:
    fake.create_delay = 0.05
    responses = await asyncio.gather(*(fake_ctl.create(EXAMPLE_IMAGE, service_id="s", epoch=1) for _ in range(5)))
    assert fake.creates == 1
    assert len({r.json()["container_id"] for r in responses}) == 1


async def test_admission_is_serialised_against_max_containers(start_fake: StartController, fake: FakeRuntime) -> None:
    fake.create_delay = 0.05
    ctl = await start_fake(max_containers=3)
    responses = await asyncio.gather(*(ctl.create(EXAMPLE_IMAGE) for _ in range(6)))
    assert sorted(r.status_code for r in responses) == [201] * 3 + [409] * 3
    assert len(fake.containers) == 3


async def test_epochs_are_seeded_from_existing_labels(start_fake: StartController, fake: FakeRuntime) -> None:
    before_restart = ContainerCreate(image=EXAMPLE_IMAGE, service_id="svc", epoch=7)
    fake.add_container(build_spec(before_restart, server_id=fake.server_id, publish_ip=""))
    ctl = await start_fake()
    stale = await ctl.create(EXAMPLE_IMAGE, service_id="svc", epoch=6)
    assert stale.json()["error"]["code"] == "STALE_EPOCH"
    assert (await ctl.create(EXAMPLE_IMAGE, service_id="svc", epoch=8)).status_code == 201


class CountingRuntime(FakeRuntime):
    """The fake, recording which runtime methods a create calls (each is a Docker round trip, or two)."""

    def __init__(self, server_id: str) -> None:
        super().__init__(server_id)
        self.calls: list[str] = []

    async def list_containers(self, **kwargs: Any) -> list[ContainerInfo]:
        self.calls.append("list_containers")
        return await super().list_containers(**kwargs)

    async def get_container(self, container_id: str) -> ContainerInfo:
        self.calls.append("get_container")
        return await super().get_container(container_id)

    async def create_container(self, spec: ContainerSpec) -> str:
        self.calls.append("create_container")
        return await super().create_container(spec)

    async def start_created(self, container_id: str) -> ContainerInfo:
        self.calls.append("start_created")
        return await super().start_created(container_id)

    async def start(self, container_id: str) -> None:
        self.calls.append("start")
        await super().start(container_id)

    async def inspect_image(self, name: str) -> ImageDetail:
        self.calls.append("inspect_image")
        return await super().inspect_image(name)


async def test_a_create_lists_once_and_inspects_nothing_before_the_start() -> None:
    """The create path's round trips: one listing (idempotency and admission), the create, the start with
    its inspect. No image inspect (the create refuses a missing image), no label check of our own id."""
    runtime = CountingRuntime("count-ctl")
    service = ContainerService(make_settings("count-ctl", max_containers=5), runtime, [])
    await service.seed_epochs()
    runtime.calls.clear()
    config = ContainerCreate(image=EXAMPLE_IMAGE, service_id="svc", epoch=1)
    first = await service.create(config)
    assert (first.created, first.status) == (True, "running")
    assert runtime.calls == ["list_containers", "create_container", "start_created"]

    runtime.calls.clear()
    again = await service.create(config)
    assert (again.container_id, again.created) == (first.container_id, False)
    assert runtime.calls == ["list_containers", "get_container"]

    runtime.calls.clear()
    missing = ContainerCreate(image="no-such-image:1", service_id="svc2", epoch=1)
    with pytest.raises(ImageNotFound) as refused:
        await service.create(missing)
    assert refused.value.details == {"image": "no-such-image:1"}
    assert runtime.calls == ["list_containers", "create_container"]
    assert len(runtime.containers) == 1


class PullingRuntime(CountingRuntime):
    """The counting fake with a registry behind it: a missing image is ImageNotPresent, and pulled
    when ``registry`` has it."""

    def __init__(self, server_id: str, registry: set[str]) -> None:
        super().__init__(server_id)
        self.registry = registry

    async def create_container(self, spec: ContainerSpec) -> str:
        try:
            return await super().create_container(spec)
        except ImageNotFound as exc:
            raise ImageNotPresent(exc.message, exc.details) from None

    async def pull_missing(self, image: str, auth: dict[str, str] | None = None) -> ImagePulled:
        self.calls.append("pull_missing")
        if image not in self.registry:
            raise ImagePullFailed(f"pulling {image!r} failed: manifest unknown", {"image": image},
                                  status_code=404)
        self.images[image] = "sha256:" + "0" * 64
        return ImagePulled(image=image, layers=2, bytes=1024, seconds=0.5)


async def test_a_create_pulls_a_missing_image_and_creates_again() -> None:
    runtime = PullingRuntime("pull-ctl", {"lab/model:1"})
    service = ContainerService(make_settings("pull-ctl", max_containers=5), runtime, [])
    await service.seed_epochs()
    runtime.calls.clear()
    made = await service.create(ContainerCreate(image="lab/model:1", service_id="svc", epoch=1))
    assert (made.created, made.status) == (True, "running")
    assert made.image_pull == ImagePulled(image="lab/model:1", layers=2, bytes=1024, seconds=0.5)
    assert runtime.calls == ["list_containers", "create_container", "pull_missing",
                             "list_containers", "create_container", "start_created"]

    # Present now: no pull, nothing said of one.
    again = await service.create(ContainerCreate(image="lab/model:1", service_id="svc2", epoch=1))
    assert again.image_pull is None

    runtime.calls.clear()
    with pytest.raises(ImagePullFailed) as failed:
        await service.create(ContainerCreate(image="lab/none:1", service_id="svc3", epoch=1))
    assert (failed.value.status_code, failed.value.details) == (404, {"image": "lab/none:1"})
    assert runtime.calls == ["list_containers", "create_container", "pull_missing"]
    assert len(runtime.containers) == 2


async def test_failed_start_leaves_no_container(fake_ctl: Ctl, fake: FakeRuntime) -> None:
    fake.failing_images.add(EXAMPLE_IMAGE)
    response = await fake_ctl.create(EXAMPLE_IMAGE, name="broken")
    assert (response.status_code, response.json()["error"]["code"]) == (422, "START_FAILED")
    assert fake.containers == {}


async def test_file_copies_over_the_fake(fake_ctl: Ctl, fake: FakeRuntime) -> None:
    cid = (await fake_ctl.create(EXAMPLE_IMAGE)).json()["container_id"]
    content = base64.b64encode(b"print(1)").decode()
    await fake_ctl.client.post(
        f"/containers/{cid}/files", json={"container_path": "/app/old/x.py", "content_base64": content}
    )
    archive = base64.b64encode(tar_of({"model/w.bin": b"w"})).decode()
    body = {"container_path": "/app/old", "archive_base64": archive, "remove_existing": True}
    assert (await fake_ctl.client.post(f"/containers/{cid}/directories", json=body)).json()["files"] == 1
    assert fake.containers[cid].files == {"/app/old/w.bin": b"w"}
    no_name = {"container_path": "/app/", "content_base64": content, "is_directory": True}
    assert (await fake_ctl.client.post(f"/containers/{cid}/files", json=no_name)).status_code == 422
    inside = {"container_path": "/app/old", "content_base64": content, "file_name": "n.py"}
    assert (await fake_ctl.client.post(f"/containers/{cid}/files", json=inside)).json()["path"] == "/app/old/n.py"
    nameless = await fake_ctl.client.post(f"/containers/{cid}/files", json={**inside, "file_name": None})
    assert (nameless.status_code, nameless.json()["error"]["code"]) == (409, "PATH_IS_DIRECTORY")
    assert fake.containers[cid].files == {"/app/old/w.bin": b"w", "/app/old/n.py": b"print(1)"}



async def test_a_merge_looks_only_where_something_may_be(fake_ctl: Ctl, fake: FakeRuntime) -> None:
    cid = (await fake_ctl.create(EXAMPLE_IMAGE)).json()["container_id"]
    fake.containers[cid].files.update({"/data/keep/a.txt": b"a", "/data/keep/deep/b.txt": b"b"})
    # 100 new trees of 10 folders each, beside the existing keep/deep; as archives.directory_archive lists them.
    new = [f"n{i}" + "/l" * depth for i in range(100) for depth in range(10)]
    folders = sorted([*new, "keep", "keep/deep", "keep/deep/more"])
    fake.stats_made = 0
    await copies.check_directory(fake, cid, "/data", folders, remove_existing=False)
    # /data; its 101 children; under them only keep/deep exists, so only its child is looked at.
    assert fake.stats_made == 1 + 101 + 1 + 1
    for clash in ("keep/a.txt", "keep/deep/b.txt"):
        with pytest.raises(PathConflict, match=f"/data/{clash} is a file"):
            await copies.check_directory(fake, cid, "/data", sorted([*folders, clash]), remove_existing=False)
    fake.stats_made = 0
    await copies.check_directory(fake, cid, "/elsewhere", folders, remove_existing=False)
    assert fake.stats_made == 1  # /elsewhere is not there, so nothing under it is


# -- serving -------------------------------------------------------------------


def test_run_logs_where_told_and_never_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:

    served: dict[str, object] = {}

    def fake_run(server: Server, sockets: object = None) -> None:
        config = server.config
        served.update(host=config.host, port=config.port, log_config=config.log_config, app=config.app,
                      closing=server.closing)
        server.started = True
        logging.getLogger("controller").info("serving %s", config.port)
        logging.getLogger("uvicorn.error").debug("uvicorn at debug too")

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(Server, "run", fake_run)
    log_file = tmp_path / "controller.log"
    settings = ControllerSettings(
        api_key="very-secret-key-0123456789", server_id="ctl", log_level="debug", log_file=log_file, gpu_devices=[],
        _env_file=None,
    )
    try:
        controller_app.run(settings, host="127.0.0.1")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    # uvicorn gets no logging config of its own: its loggers go through the handler LOG_FILE set up.
    assert (served["host"], served["port"], served["log_config"]) == ("127.0.0.1", 8001, None)
    # Its long polls answer as soon as it begins to stop.
    assert served["closing"] == served["app"].state.jobs.closing  # type: ignore[attr-defined]
    text = log_file.read_text()
    assert "serving 8001" in text and "uvicorn at debug too" in text
    assert "very-secret-key-0123456789" not in text


async def test_docker_going_away_is_503_not_500(fake_ctl: Ctl, fake: FakeRuntime) -> None:
    assert (await fake_ctl.client.get("/health")).status_code == 200
    fake.docker_up = False
    health = await fake_ctl.client.get("/health")
    assert (health.status_code, health.json()["status"], health.json()["docker"]) == (503, "unhealthy", False)
    for method, path in [("GET", "/containers"), ("POST", "/containers/x/stop"), ("DELETE", "/images/x")]:
        response = await fake_ctl.client.request(method, path)
        assert (response.status_code, response.json()["error"]["code"]) == (503, "DOCKER_UNAVAILABLE")


async def test_a_closed_runtime_answers_docker_unavailable() -> None:
    runtime = DockerRuntime(ControllerSettings(_env_file=None, api_key=KEY, server_id="closed", gpu_devices=[]))
    await runtime.close()
    assert await runtime.ping() is False
    with pytest.raises(DockerUnavailable, match="shutting down"):
        await runtime.list_containers(all=True)
