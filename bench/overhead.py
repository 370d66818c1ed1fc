"""Hub overhead on a real start: create-and-start of one service through the hub's
public API against the same container made with the docker SDK directly.

Real processes (a hub and two controllers started with ``mmanager``), real
PostgreSQL (a throwaway cluster, or MMANAGER_BENCH_DATABASE_URL), the real
Docker engine, the locally built example image. Three ways to the same running
container, interleaved in a shuffled order each round so that drift in the
engine (its state, the page cache) falls on all three alike:

- ``hub``: ``POST /api/{user}/{repo}/services`` (waits for the start, as a
  client does by default) until the 201; the service is deleted afterwards;
- ``controller``: ``POST /containers`` on a controller that no hub knows, with
  the body the hub would send it; the container is removed afterwards;
- ``docker``: ``containers.run(...)`` with the very kwargs the controller hands
  the SDK (``controller.spec.build_spec`` then ``controller.runtime``'s), so the
  same image, ports, labels, limits, hardening and log rotation.

The hub/docker ratio of the medians is the overhead the issue's target is about
(at most 1.05); controller/docker and hub/controller split it between the two
hops. Each hub create's operation record adds its duration as the hub saw it
(from the operation's creation to its end, without HTTP and authentication).
With ``--profile`` (needs py-spy) the hub is sampled during the run and its
busiest functions are listed.

    python -m bench.overhead [--runs 30] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
from docker.types import LogConfig
from prometheus_client.parser import text_string_to_metric_families

from bench.common import scratch
from bench.pyspy import Recording, print_summary, profile_dir
from controller.config import ControllerSettings
from controller.runtime import _create_kwargs
from controller.spec import build_spec
from examples.images import EXAMPLE_IMAGE, build_example_image
from hub.schemas import ServiceSpec
from mmanager.wire import ContainerCreate, parse_memory
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, api, sdk

# No health check: a create answers once the container runs, on every path.
SPEC = {"image": EXAMPLE_IMAGE, "ports": {"5000": None}, "resources": {"cpu_limit": 0.1, "memory_limit": "16MB"}}
WAYS = ("hub", "controller", "docker")
# HostConfig fields that must match between a hub-made and an SDK-made container for the comparison to be fair.
COMPARED = ("Memory", "NanoCpus", "PidsLimit", "SecurityOpt", "CgroupnsMode", "RestartPolicy", "LogConfig",
            "CapDrop", "CapAdd", "ReadonlyRootfs", "Privileged", "AutoRemove")


def container_config(spec: ServiceSpec, name: str, service_id: str) -> ContainerCreate:
    """What ``hub.services.lifecycle`` sends a controller for this spec (no volumes, no GPUs)."""
    return ContainerCreate(
        name=name, image=spec.image, command=spec.command, environment=dict(spec.env),
        ports={(k if "/" in k else f"{k}/tcp"): v for k, v in spec.ports.items()},
        memory_limit=spec.resources.memory_limit, cpu_limit=spec.resources.cpu_limit,
        restart_policy=spec.restart_policy, labels=dict(spec.labels), service_id=service_id, epoch=1,
    )


def sdk_kwargs(config: ContainerCreate, settings: ControllerSettings) -> dict[str, Any]:
    """The kwargs ``DockerRuntime.create_container`` gives the SDK for ``config`` (a container without GPUs)."""
    spec = build_spec(config, server_id=settings.server_id, publish_ip=settings.publish_ip,
                      policy=settings.spec_policy, pids_limit=settings.pids_limit,
                      default_memory=parse_memory(settings.default_memory_limit))
    config_kwargs, host = _create_kwargs(spec)
    # containers.run takes the host config's arguments by the same names, but the published ports as ``ports``.
    if "port_bindings" in host:
        host["ports"] = host.pop("port_bindings")
    kwargs = {**config_kwargs, **host}
    kwargs["log_config"] = LogConfig(type=LogConfig.types.JSON,
                                     config={"max-size": settings.log_max_size, "max-file": str(settings.log_max_files)})
    kwargs["environment"].append("NVIDIA_VISIBLE_DEVICES=void")
    return kwargs


def host_config_differences(docker_client: docker.DockerClient, a: str, b: str) -> dict[str, Any]:
    """The COMPARED HostConfig fields on which containers ``a`` and ``b`` differ, and their published ports' shape."""
    ha, hb = (docker_client.api.inspect_container(c)["HostConfig"] for c in (a, b))
    diff = {key: (ha.get(key), hb.get(key)) for key in COMPARED if ha.get(key) != hb.get(key)}

    def shape(h: dict[str, Any]) -> dict[str, list[str]]:
        return {port: [b.get("HostIp", "") for b in binds or []] for port, binds in (h.get("PortBindings") or {}).items()}

    if shape(ha) != shape(hb):
        diff["PortBindings"] = (shape(ha), shape(hb))
    return diff


def controller_calls(client: httpx.Client) -> tuple[float, int]:
    """Sum and count of the hub's ``create`` calls to controllers, from its /metrics (timed by the hub)."""
    total, count = 0.0, 0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name != "mmanager_controller_call_duration_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("call") != "create":
                continue
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += int(sample.value)
    return total, count


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median_ms": round(statistics.median(values) * 1000, 1), "p90_ms": round(p90 * 1000, 1),
            "min_ms": round(ordered[0] * 1000, 1), "max_ms": round(ordered[-1] * 1000, 1)}


def measure(db_url: str, workdir: Path, runs: int, docker_client: docker.DockerClient, *, seed: int = 1,
            profile: Path | None = None) -> dict[str, Any]:
    """``runs`` creates each way, interleaved; raw times in seconds, plus the hub's operation durations."""
    dep = LocalDeployment(db_url, workdir)
    dep.plan_hubs(1)
    hubbed = dep.add_controller("alpha")
    solo = dep.add_controller("solo", push=False, listed=False)
    token = dep.create_admin()
    direct_settings = ControllerSettings(MMANAGER_API_KEY=dep.key, SERVER_ID=f"direct-{dep.run}",
                                         PUBLISH_IP="127.0.0.1")
    spec = ServiceSpec.model_validate({**SPEC, "name": "probe"})
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    op_seconds: list[float] = []
    try:
        dep.start()
        # The timed create is raw HTTP, as the controller's and Docker's are (its cost is what is measured),
        # and so is the hub's /metrics; everything else goes through the SDK.
        client = api(dep.hub(0).url, token)
        hub = sdk(dep.hub(0).url, token)
        wait_until(lambda: hub.controllers.get(hubbed.name).status == "healthy", 30, what="the controller healthy")
        controller = httpx.Client(base_url=solo.url, headers={"Authorization": f"Bearer {dep.key}"}, timeout=60)

        def via_hub(i: int) -> tuple[float, str]:
            started = time.perf_counter()
            r = client.post("/api/root/bench/services", json={**SPEC, "name": f"h{i}"})
            took = time.perf_counter() - started
            r.raise_for_status()
            service = r.json()
            assert service["status"] == "running", service
            return took, service["id"]

        def via_controller(i: int) -> tuple[float, str]:
            body = container_config(spec, f"mm-bench-c{i}-{dep.run}", uuid.uuid4().hex)
            started = time.perf_counter()
            r = controller.post("/containers", json=body.model_dump(mode="json", exclude_none=True))
            took = time.perf_counter() - started
            r.raise_for_status()
            created = r.json()
            assert created["status"] == "running", created
            return took, created["container_id"]

        def via_docker(i: int) -> tuple[float, str]:
            kwargs = sdk_kwargs(container_config(spec, f"mm-bench-d{i}-{dep.run}", uuid.uuid4().hex),
                                direct_settings)
            started = time.perf_counter()
            container = docker_client.containers.run(EXAMPLE_IMAGE, detach=True, **kwargs)
            took = time.perf_counter() - started
            # run() answers after the start without inspecting again; check it outside the timing.
            container.reload()
            assert container.status == "running", container.status
            assert container.id is not None  # run() answers the container it made, id and all
            return took, container.id

        def compare_once() -> dict[str, Any]:
            """One container each way, kept until both are compared: the fairness check."""
            _, service_id = via_hub(-1)
            _, direct_id = via_docker(-1)
            try:
                hub_container = hub.services.get(service_id).container_id
                assert hub_container is not None
                return host_config_differences(docker_client, hub_container, direct_id)
            finally:
                hub.services.delete(service_id)
                docker_client.api.remove_container(direct_id, force=True)

        # A warm-up of each way (first connections, first imports), then the fairness check.
        differences = compare_once()
        _, cid = via_controller(-2)
        controller.delete(f"/containers/{cid}", params={"force": "true"}).raise_for_status()

        calls_before = controller_calls(client)
        timed_services: set[str] = set()
        order = random.Random(seed)
        for i in range(runs):
            ways = list(WAYS)
            order.shuffle(ways)
            for way in ways:
                if way == "hub":
                    took, service_id = via_hub(i)
                    timed_services.add(service_id)
                    hub.services.delete(service_id)
                elif way == "controller":
                    took, cid = via_controller(i)
                    controller.delete(f"/containers/{cid}", params={"force": "true"}).raise_for_status()
                else:
                    took, cid = via_docker(i)
                    docker_client.api.remove_container(cid, force=True)
                times[way].append(took)
        calls_after = controller_calls(client)
        # The hub's creates again, this time sampled by py-spy (which slows what it samples: kept out of the timings).
        summary = None
        if profile is not None:
            hub_popen = dep.hub(0).popen
            assert hub_popen is not None
            with Recording(hub_popen.pid, profile) as recording:
                for i in range(runs):
                    _, service_id = via_hub(runs + i)
                    hub.services.delete(service_id)
            summary = recording.summary()
        for op in hub.operations.list(operation="create", limit=1000):
            if op.service_id in timed_services and op.status == "succeeded" and op.finished_at:
                op_seconds.append((op.finished_at - op.created_at).total_seconds())
        calls = calls_after[1] - calls_before[1]
        hub_call = (calls_after[0] - calls_before[0]) / calls if calls else None
        return {"times": times, "operation_s": op_seconds,
                "controller_call_mean_s": hub_call, "differences": differences, "profile": summary}
    finally:
        dep.stop(docker_client)
        for c in docker_client.containers.list(all=True, filters={"label": f"mmanager.controller={direct_settings.server_id}"}):
            c.remove(force=True)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    times = raw["times"]
    medians = {way: statistics.median(times[way]) for way in WAYS}
    result: dict[str, Any] = {
        "runs": len(times["hub"]),
        **{way: _stats(times[way]) for way in WAYS},
        "ratio_hub_docker": round(medians["hub"] / medians["docker"], 3),
        "ratio_controller_docker": round(medians["controller"] / medians["docker"], 3),
        "ratio_hub_controller": round(medians["hub"] / medians["controller"], 3),
        "hub_extra_ms": round((medians["hub"] - medians["controller"]) * 1000, 1),
        "controller_extra_ms": round((medians["controller"] - medians["docker"]) * 1000, 1),
        "host_config_differences": raw["differences"],
    }
    if raw["operation_s"]:
        result["hub_operation"] = _stats(raw["operation_s"])
    if raw["controller_call_mean_s"] is not None:
        # Wall time on the hub path: the hub's call to the controller (as the hub timed it) and the rest, its own.
        call = raw["controller_call_mean_s"]
        result["hub_controller_call_mean_ms"] = round(call * 1000, 1)
        result["hub_own_ms"] = round((statistics.mean(times["hub"]) - call) * 1000, 1)
    if raw["profile"] is not None:
        result["hub_profile"] = raw["profile"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                        help="sample the hub with py-spy (extra, untimed creates); keep the raw samples in DIR")
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()
    docker_client = docker.from_env()
    build_example_image(docker_client, EXAMPLE_IMAGE)
    with ExitStack() as stack:
        server, workdir = scratch(stack)
        db_url = asyncio.run(create_database(server, "bench"))
        profiles = profile_dir(args.profile, workdir)
        profile = profiles / "overhead-hub.pyspy" if profiles else None
        result = summarize(measure(db_url, workdir / "run", args.runs, docker_client, seed=args.seed,
                                   profile=profile))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['runs']} creates each way, interleaved; host config differences: "
          f"{result['host_config_differences'] or 'none'}")
    print("\n| way | median | p90 | min | max |")
    print("|---|---|---|---|---|")
    for way in WAYS:
        s = result[way]
        print(f"| {way} | {s['median_ms']} ms | {s['p90_ms']} ms | {s['min_ms']} ms | {s['max_ms']} ms |")
    print(f"\nhub/docker {result['ratio_hub_docker']} (target <= 1.05), controller/docker "
          f"{result['ratio_controller_docker']}, hub/controller {result['ratio_hub_controller']}; "
          f"hub adds {result['hub_extra_ms']} ms, controller adds {result['controller_extra_ms']} ms")
    if "hub_operation" in result:
        print(f"hub create operation (record's start to end): median {result['hub_operation']['median_ms']} ms")
    if "hub_own_ms" in result:
        print(f"hub path, means: the hub's call to the controller {result['hub_controller_call_mean_ms']} ms, "
              f"the rest (the hub's own work and waits) {result['hub_own_ms']} ms")
    if "hub_profile" in result:
        print_summary(result["hub_profile"], "hub profile", packages=None, own=None)


if __name__ == "__main__":
    main()
