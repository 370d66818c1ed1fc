"""controller.vram's mapping of a process to its container, on the real Docker engine and the real /proc:
every process of a running container (its main one from State.Pid, and the others ``docker top`` lists)
maps back to that container's id; this test's own process maps to none of it."""

from __future__ import annotations

import os
import uuid

import docker

from controller.vram import container_of, per_container


def test_each_process_of_a_container_maps_back_to_it(docker_client: docker.DockerClient, example_image: str) -> None:
    container = docker_client.containers.run(example_image, name=f"mm-vram-pids-{uuid.uuid4().hex[:8]}",
                                             detach=True, labels={"mmanager.test": "vram-pids"})
    try:
        container.exec_run(["sh", "-c", "sleep 60 &"], detach=True)
        container.reload()
        main = container.attrs["State"]["Pid"]
        assert main > 0 and container_of(main) == container.id
        top = container.top(ps_args="-eo pid")
        pids = [int(row[0]) for row in top["Processes"]]
        assert main in pids
        assert {container_of(pid) for pid in pids} == {container.id}
        assert container_of(os.getpid()) != container.id
        # As the watch sums them: each process's VRAM counted to this container.
        processes = [("0", pid, 1000) for pid in pids] + [("0", os.getpid(), 5000)]
        assert per_container(processes, {container.id}, container_of) == {container.id: 1000 * len(pids)}
    finally:
        container.remove(force=True)
