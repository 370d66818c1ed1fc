"""controller.vram with the fake NVML (per-process VRAM) and the fake runtime: a shared-GPU container over
its budget for MMANAGER_GPU_MEMORY_STRIKES samples in a row is restarted, audited and counted; one under
it, one without a budget, a transient peak and a process of no container are left alone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.audit import AuditTrail
from controller.config import ControllerSettings
from controller.containers import ContainerService
from controller.errors import ContainerNotRunning, NotFound
from controller.fake import FakeRuntime
from controller.gpu import LABEL_GPU_MEMORY, LABEL_GPUS
from controller.gpu_monitor import GpuMonitor
from controller.health import ControllerMetrics
from controller.spec import ContainerSpec
from controller.vram import MAX_RESTARTS, RESTART_WINDOW, VramWatch, container_of, per_container
from mmanager.wire import LABEL_CONTROLLER, LABEL_MANAGED, LABEL_SERVICE
from tests.unit.test_gpu_monitor import FakeGpu, FakeNvml, health

GiB = 1024**3


def shared(runtime: FakeRuntime, service: str, budget: int | None, gpu: str = "0") -> str:
    labels = {LABEL_MANAGED: "true", LABEL_CONTROLLER: "ctl", LABEL_SERVICE: service, LABEL_GPUS: gpu}
    if budget is not None:
        labels[LABEL_GPU_MEMORY] = str(budget)
    return runtime.add_container(ContainerSpec(image="mmanager/example-model:latest", labels=labels)).id


class World:
    """A GPU host: the fake runtime, the fake NVML, and which container each pid runs in."""

    def __init__(self, strikes: int = 2) -> None:
        self.runtime = FakeRuntime("ctl")
        self.gpu = FakeGpu()
        self.nvml = FakeNvml([self.gpu])
        self.monitor = GpuMonitor(10.0, nvml=self.nvml)
        assert self.monitor.open()
        self.pids: dict[int, str] = {}
        self.healed: list[str] = []
        self.metrics = ControllerMetrics("ctl")
        self.audit = AuditTrail("ctl", 100)

        async def heal(cid: str, timeout: int) -> None:
            self.healed.append(cid)
            await self.runtime.restart(cid, timeout)

        self.now = 0.0
        self.watch = VramWatch(10.0, self.runtime, heal, self.monitor, strikes=strikes, audit=self.audit,
                               metrics=self.metrics, locate=self.pids.get, clock=lambda: self.now)

    def uses(self, cid: str, pid: int, size: int) -> None:
        self.pids[pid] = cid
        self.gpu.processes[pid] = size

    def restarts_counted(self) -> dict[str, float]:
        text = self.metrics.render(health()).decode()
        return {s.labels["service"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "mmanager_gpu_memory_restarts_total"}


async def test_over_budget_for_two_samples_is_restarted_audited_and_counted() -> None:
    world = World()
    hog = shared(world.runtime, "svc-hog", 4 * GiB)
    fine = shared(world.runtime, "svc-fine", 8 * GiB)
    whole = shared(world.runtime, "svc-whole", None, gpu="0")
    # Two processes of the hog sum over its budget; the others stay within theirs (or have none).
    world.uses(hog, 100, 3 * GiB)
    world.uses(hog, 101, 2 * GiB)
    world.uses(fine, 200, 7 * GiB)
    world.uses(whole, 300, 60 * GiB)
    world.gpu.processes[999] = 10 * GiB  # a process of no container (the host's own)

    await world.watch.run_once()
    assert world.healed == [] and world.watch.over == {hog: 1}
    await world.watch.run_once()
    assert world.healed == [hog]
    assert world.runtime.containers[hog].restarts == 1
    assert world.restarts_counted() == {"svc-hog": 1.0}
    [event] = world.audit.batch()
    assert (event.actor, event.method, event.path, event.target, event.status_code) == (
        "controller:ctl", "POST", f"/containers/{hog}/restart", hog, 200)
    assert event.details == {"reason": "gpu_memory_exceeded", "service_id": "svc-hog", "gpu": "0",
                             "used_bytes": 5 * GiB, "budget_bytes": 4 * GiB, "samples": 2}
    # The count starts again after a restart: one more sample over is not a second restart.
    await world.watch.run_once()
    assert world.healed == [hog]


async def test_a_transient_peak_is_forgiven() -> None:
    world = World()
    cid = shared(world.runtime, "svc", 4 * GiB)
    world.uses(cid, 100, 5 * GiB)
    await world.watch.run_once()
    world.gpu.processes[100] = 3 * GiB
    await world.watch.run_once()
    world.gpu.processes[100] = 5 * GiB
    await world.watch.run_once()
    assert world.healed == [] and world.watch.over == {cid: 1}


async def test_one_strike_restarts_at_the_first_sample_over() -> None:
    world = World(strikes=1)
    cid = shared(world.runtime, "svc", 4 * GiB)
    world.uses(cid, 100, 4 * GiB + 1)
    await world.watch.run_once()
    assert world.healed == [cid]


async def test_nothing_is_read_without_a_budgeted_container_and_a_gone_one_is_no_error() -> None:
    world = World()
    shared(world.runtime, "svc-whole", None)
    await world.watch.run_once()
    assert world.nvml.process_reads == 0
    cid = shared(world.runtime, "svc", GiB)
    world.uses(cid, 100, 2 * GiB)
    await world.watch.run_once()

    async def gone(container_id: str, timeout: int) -> None:
        raise NotFound("gone")

    world.watch.heal = gone
    await world.watch.run_once()
    assert world.restarts_counted() == {} and world.audit.batch() == []


async def test_a_gpu_nvml_refuses_and_a_use_it_does_not_give_are_left_out() -> None:
    nvml = FakeNvml([FakeGpu(processes={1: GiB, 2: None}), FakeGpu(errors={"processes": 999})])
    monitor = GpuMonitor(10.0, nvml=nvml)
    assert monitor.open()
    assert monitor.process_memory() == [("0", 1, GiB)]
    assert per_container([("0", 1, GiB), ("0", 2, GiB), ("1", 3, GiB)], {"a"}, {1: "a", 2: "a", 3: "b"}.get) == {
        "a": 2 * GiB}


def test_container_of_reads_the_cgroup(tmp_path: Path) -> None:
    cid = "a" * 64
    for pid, text in [(1, f"0::/system.slice/docker-{cid}.scope\n"), (2, f"12:memory:/docker/{cid}\n0::/\n"),
                      (3, "0::/user.slice/user-0.slice/session-1.scope\n")]:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    assert container_of(1, tmp_path) == cid and container_of(2, tmp_path) == cid
    assert container_of(3, tmp_path) is None and container_of(4, tmp_path) is None


def test_the_watch_starts_only_where_nvml_answers() -> None:
    world = World()
    idle = VramWatch(10.0, world.runtime, world.watch.heal, GpuMonitor(10.0, nvml=FakeNvml([])))
    idle.start()
    assert not idle.running()


async def test_restarts_stop_after_the_cap_within_the_window_and_say_so() -> None:
    world = World(strikes=1)
    cid = shared(world.runtime, "svc", 4 * GiB)
    world.uses(cid, 100, 5 * GiB)
    for _ in range(MAX_RESTARTS + 3):
        await world.watch.run_once()
        world.now += 60
    assert world.healed == [cid] * MAX_RESTARTS
    events = world.audit.batch()
    assert [e.details["reason"] for e in events] == ["gpu_memory_exceeded"] * MAX_RESTARTS + [
        "gpu_memory_restarts_stopped"]
    assert events[-1].details["restarts"] == MAX_RESTARTS and events[-1].status_code == 409
    assert world.restarts_counted() == {"svc": float(MAX_RESTARTS)}
    # Once the window has passed since those restarts, it is restarted again.
    world.now += RESTART_WINDOW
    await world.watch.run_once()
    assert world.healed == [cid] * (MAX_RESTARTS + 1)


async def test_processes_of_no_container_are_told_once(caplog: pytest.LogCaptureFixture) -> None:
    """NVML's host pids map to no container when the controller sees another PID namespace."""
    world = World()
    cid = shared(world.runtime, "svc", 4 * GiB)
    world.gpu.processes[100] = 5 * GiB  # the container's process, but /proc here does not show it
    with caplog.at_level(logging.WARNING, logger="controller.vram"):
        for _ in range(3):
            await world.watch.run_once()
    told = [r for r in caplog.records if "none maps to a container" in r.getMessage()]
    assert len(told) == 1 and world.healed == []
    world.uses(cid, 101, GiB)
    await world.watch.run_once()
    assert world.watch._unmapped_told


async def test_a_container_stopped_before_the_lock_is_not_revived() -> None:
    runtime = FakeRuntime("ctl")
    service = ContainerService(ControllerSettings(api_key="k" * 32, server_id="ctl", server_type="cpu",
                                                  publish_ip="127.0.0.1"), runtime, [])
    cid = shared(runtime, "svc", 4 * GiB)
    # The watch listed it running; the hub stops it before the restart takes the service's lock.
    await runtime.stop(cid, 1)
    with pytest.raises(ContainerNotRunning):
        await service.heal(cid, 1, if_running=True)
    assert (await runtime.get_container(cid)).status != "running"
    # The health prober's restart (no if_running) is unchanged.
    await service.heal(cid, 1)
    assert (await runtime.get_container(cid)).status == "running"
