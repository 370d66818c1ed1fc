"""Shared GPUs on the controller (issue 25): a VRAM budget on one GPU, recorded in the container's labels,
said in its environment, refused when it no longer fits. The fake runtime with a ``GPU_DEVICES`` inventory,
then the real engine (no NVIDIA device here: what the controller asks Docker for)."""

from __future__ import annotations

import docker
import pytest

from controller.config import parse_gpu_devices
from controller.containers import ContainerService
from controller.errors import GpuUnavailable, InvalidRequest
from controller.fake import FakeRuntime
from controller.gpu import choose_shared_gpu, gpu_shares
from examples.images import EXAMPLE_IMAGE
from mmanager.wire import ContainerCreate, ContainerInfo
from tests.controller.conftest import StartController, make_settings

GIB = 1024**3
MIB = 1024**2


def info(status: str, gpus: str, budget: int | None = None) -> ContainerInfo:
    labels = {"mmanager.gpus": gpus, **({"mmanager.gpu_memory": str(budget)} if budget else {})}
    return ContainerInfo(id="x", container_id="x", name="x", image="i", status=status, labels=labels,
                         gpu_device_ids=[g for g in gpus.split(",") if g])


def test_shares_come_from_the_labels() -> None:
    whole, shared = gpu_shares([info("running", "0"), info("running", "1", 4 * GIB), info("created", "1", 2 * GIB),
                                info("exited", "2", 8 * GIB), info("running", "3,4")])
    assert whole == {"0", "3", "4"} and shared == {"1": 6 * GIB}


def test_shared_gpu_choice() -> None:
    inventory = parse_gpu_devices("0:A100:81920,1:L4:24576,2:L4:24576")
    # Best fit: the GPU left with the least budget after it.
    assert choose_shared_gpu(inventory, set(), {"2": 12 * GIB}, 8 * GIB, None) == "2"
    assert choose_shared_gpu(inventory, {"1", "2"}, {}, 8 * GIB, None) == "0"
    # The hub's choice, as long as it still fits; the hub's view may lag, the labels do not.
    assert choose_shared_gpu(inventory, set(), {}, 8 * GIB, ["0"]) == "0"
    with pytest.raises(GpuUnavailable):
        choose_shared_gpu(inventory, set(), {"1": 20 * GIB}, 8 * GIB, ["1"])
    with pytest.raises(GpuUnavailable):
        choose_shared_gpu(inventory, {"0"}, {}, 8 * GIB, ["0"])
    with pytest.raises(GpuUnavailable):
        choose_shared_gpu(inventory, {"0"}, {"1": 20 * GIB, "2": 20 * GIB}, 8 * GIB, None)
    with pytest.raises(InvalidRequest):
        choose_shared_gpu(inventory, set(), {}, 8 * GIB, ["7"])
    with pytest.raises(InvalidRequest):
        choose_shared_gpu(inventory, set(), {}, 8 * GIB, ["0", "1"])


async def test_shared_containers_on_the_fake_runtime() -> None:
    runtime = FakeRuntime("share-ctl")
    gpus = parse_gpu_devices("0:L4:24576,1:L4:24576")
    service = ContainerService(make_settings("share-ctl", max_containers=10), runtime, gpus)
    await service.seed_epochs()

    def shared(n: int, gib: int, ids: list[str] | None = None) -> ContainerCreate:
        return ContainerCreate(image=EXAMPLE_IMAGE, service_id=f"s{n}", epoch=1, gpu_memory=gib * GIB,
                               gpu_device_ids=ids)

    first = await service.create(shared(1, 10, ["0"]))
    second = await service.create(shared(2, 10, ["0"]))
    assert first.gpu_device_ids == second.gpu_device_ids == ["0"]
    spec = runtime.containers[first.container_id].spec
    assert spec.labels["mmanager.gpus"] == "0" and spec.labels["mmanager.gpu_memory"] == str(10 * GIB)
    assert spec.environment["MMANAGER_GPU_MEMORY_BYTES"] == str(10 * GIB)
    assert spec.environment["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={10 * GIB // MIB}M"
    # The hub's view lagged: 10 GiB more does not fit on GPU 0 (20 of 24 committed).
    with pytest.raises(GpuUnavailable):
        await service.create(shared(3, 10, ["0"]))
    # A whole ask never takes a GPU with shared tenants, nor a share a GPU held whole.
    whole = await service.create(ContainerCreate(image=EXAMPLE_IMAGE, service_id="w", epoch=1, gpu_count=1))
    assert whole.gpu_device_ids == ["1"]
    with pytest.raises(GpuUnavailable):
        await service.create(ContainerCreate(image=EXAMPLE_IMAGE, service_id="w2", epoch=1, gpu_count=1))
    with pytest.raises(GpuUnavailable):
        await service.create(shared(4, 2, ["1"]))
    # A restarted controller (a new service on the same runtime) sees the same allocation, from the labels.
    again = ContainerService(make_settings("share-ctl", max_containers=10), runtime, gpus)
    await again.seed_epochs()
    assert (await again.create(shared(5, 4))).gpu_device_ids == ["0"]
    with pytest.raises(GpuUnavailable):
        await again.create(shared(6, 1))


async def test_shared_gpu_on_the_real_engine(
    start_controller: StartController, example_image: str, docker_client: docker.DockerClient
) -> None:
    ctl = await start_controller(gpu_devices="0:A100:81920,1:A100:81920", server_type="gpu")
    first = (await ctl.create(example_image, gpu_memory=8 * GIB, gpu_device_ids=["1"])).json()
    second = (await ctl.create(example_image, gpu_memory=4 * GIB)).json()
    assert first["gpu_device_ids"] == second["gpu_device_ids"] == ["1"]
    attrs = docker_client.api.inspect_container(first["container_id"])
    env = attrs["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=1" in env and f"MMANAGER_GPU_MEMORY_BYTES={8 * GIB}" in env
    assert f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={8 * 1024}M" in env
    assert attrs["Config"]["Labels"]["mmanager.gpus"] == "1"
    assert attrs["Config"]["Labels"]["mmanager.gpu_memory"] == str(8 * GIB)

    whole = await ctl.create(example_image, gpu_count=1, gpu_device_ids=["1"])
    assert (whole.status_code, whole.json()["error"]["code"]) == (409, "GPU_UNAVAILABLE")
    too_big = await ctl.create(example_image, gpu_memory=70 * GIB, gpu_device_ids=["1"])
    assert (too_big.status_code, too_big.json()["error"]["code"]) == (409, "GPU_UNAVAILABLE")
