"""A real registry on 127.0.0.1 for the pull tests: Debian's ``docker-registry``, plain HTTP (Docker trusts
127.0.0.0/8 without TLS), its storage in a temporary folder, with htpasswd logins when users are given."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker

from tests.support.net import free_port, terminate, wait_for_port


@contextlib.contextmanager
def serve_registry(where: Path, users: dict[str, str] | None = None) -> Iterator[str]:
    """Run a registry until the block ends; yields its address (``127.0.0.1:<port>``). With ``users``
    (name: password), every call needs one of their logins (bcrypt htpasswd, as the registry takes it)."""
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed: make system-deps (scripts/ensure-system-deps.sh)"
    port = free_port()
    config = [
        "version: 0.1",
        "log: {level: warn}",
        f"storage: {{filesystem: {{rootdirectory: {where / 'data'}}}}}",
        f"http: {{addr: 127.0.0.1:{port}}}",
    ]
    if users:
        htpasswd = shutil.which("htpasswd")
        assert htpasswd, "htpasswd is not installed: make system-deps (scripts/ensure-system-deps.sh)"
        passwords = where / "htpasswd"
        passwords.touch(mode=0o600)
        for name, password in users.items():
            # -i: the password from stdin, never on a command line.
            subprocess.run([htpasswd, "-iB", str(passwords), name], input=password.encode(), check=True,
                           capture_output=True)
        config.append(f"auth: {{htpasswd: {{realm: mmanager-test, path: {passwords}}}}}")
    (where / "registry.yml").write_text("\n".join(config) + "\n")
    with (where / "registry.log").open("wb") as out:
        proc = subprocess.Popen([binary, "serve", str(where / "registry.yml")], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 20, proc)
        yield f"127.0.0.1:{port}"
    finally:
        terminate(proc)


def push(client: docker.DockerClient, image: str, repository: str, tag: str,
         auth: dict[str, str] | None = None) -> str:
    """Tag ``image`` as ``repository:tag``, push it (logged in with ``auth``), and remove that local tag
    again, so that a create must pull it; the reference pushed."""
    client.images.get(image).tag(repository, tag)
    try:
        for event in client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth):
            assert "error" not in event, event
    finally:
        client.images.remove(f"{repository}:{tag}")
    return f"{repository}:{tag}"


@contextlib.contextmanager
def throttled(registry: str, bytes_per_second: int) -> Iterator[str]:
    """A TCP proxy in front of ``registry`` that sends the registry's answers at most ``bytes_per_second``
    (a slow link to it), so that a pull through it lasts long enough to be watched; yields its address."""
    host, port = registry.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    stopping = threading.Event()
    chunk = max(bytes_per_second // 20, 1024)

    def pipe(source: socket.socket, sink: socket.socket, slow: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(chunk):
                sink.sendall(data)
                if slow:
                    time.sleep(len(data) / bytes_per_second)  # the link's pace, not a wait for an event
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection((host, int(port)))
            threading.Thread(target=pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, True), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield address
    finally:
        stopping.set()
        server.join(timeout=5)
        listener.close()
