"""A quiet hub's CPU: what the hub's loops cost when nobody calls it.

A hub and one controller as real processes (``mmanager``), a throwaway PostgreSQL cluster (or
MMANAGER_BENCH_DATABASE_URL), the real Docker engine running ``--services`` services of the locally
built example image. Once they run, the hub's CPU is read with psutil over ``--seconds`` while only its
own loops (the reconciler's tick, the replica's beat, the poller, the heartbeat flush) and the
controller's heartbeats run. With ``--profile`` (needs py-spy), the hub is then sampled for as long again
and its busiest functions are listed.

    python -m bench.idle [--services 5] [--seconds 30] [--profile [DIR]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import docker
import psutil

from bench.api_floor import SPEC
from bench.common import scratch
from bench.pyspy import Recording, print_summary, profile_dir
from examples.images import build_example_image
from tests.support.pg import create_database
from tests.support.poll import wait_until
from tests.support.procs import LocalDeployment, sdk


def measure(db_url: str, workdir: Path, docker_client: docker.DockerClient, *, services: int = 5,
            seconds: float = 30.0, settle: float = 5.0, profile: Path | None = None) -> dict[str, Any]:
    dep = LocalDeployment(db_url, workdir, extra_hub_env={"MMANAGER_MAX_SERVICES_PER_USER": str(services + 1)})
    dep.plan_hubs(1)
    ctl = dep.add_controller("alpha")
    token = dep.create_admin()
    try:
        dep.start()
        with sdk(dep.hub(0).url, token) as client:
            wait_until(lambda: client.controllers.get(ctl.name).status == "healthy", 30, what="the controller healthy")
            for i in range(services):
                # An ApiError names the service's failure (its code and message).
                client.services.create({**SPEC, "name": f"idle-{i}",
                                        "resources": {**SPEC["resources"], "cpu_limit": 0.02}},
                                       owner="root", repo="bench")
        time.sleep(settle)  # the creates' follow-ups done
        hub_popen = dep.hub(0).popen
        assert hub_popen is not None
        hub = psutil.Process(hub_popen.pid)
        before, started = hub.cpu_times(), time.perf_counter()
        time.sleep(seconds)
        after, wall = hub.cpu_times(), time.perf_counter() - started
        # A loop that fails on every tick costs CPU too (and logs it): the measure counts only a hub whose
        # loops work.
        errors = [line for line in dep.hub(0).log.read_text(errors="replace").splitlines()
                  if " ERROR " in line or "Traceback" in line]
        result: dict[str, Any] = {
            "services": services, "seconds": seconds,
            "hub_cores": round((after.user + after.system - before.user - before.system) / wall, 4),
            "hub_error_lines": len(errors), "first_errors": errors[:5],
        }
        if profile is not None:
            with Recording(hub.pid, profile / "idle.pyspy") as recording:
                time.sleep(seconds)
            result["profile"] = recording.summary(top=20)
        return result
    finally:
        dep.stop(docker_client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--profile", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                        help="also sample the hub with py-spy (files in DIR, default a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/idle.json"))
    args = parser.parse_args()
    docker_client = docker.from_env()
    build_example_image(docker_client)
    with ExitStack() as stack:
        server, workdir = scratch(stack)
        db_url = asyncio.run(create_database(server, "bench"))
        result = measure(db_url, workdir / "run", docker_client, services=args.services, seconds=args.seconds,
                         profile=profile_dir(args.profile, workdir))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"a quiet hub, 1 controller, {args.services} services, {args.seconds:g} s: "
          f"{result['hub_cores']} hub cores; {result['hub_error_lines']} error lines in the hub's log")
    if result.get("profile"):
        print_summary(result["profile"], "hub profile")


if __name__ == "__main__":
    main()
