"""Images built locally, for the demo and the tests.

There may be no registry to pull from, so the example model service is built
``FROM scratch`` around a static busybox: ``httpd`` serves ``/health`` and
``/model/info`` on port 5000. Building needs the ``busybox-static`` binary
(Debian's package of that name) on the machine that talks to the engine.
The reference model service's image (torch, seed 000's API) is built by
scripts/build-modelserver-image.sh, which skips a build whose sources are
unchanged; ``build_modelserver_image`` runs it.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import docker

EXAMPLE_IMAGE = "mmanager/example-model:latest"
MODELSERVER_IMAGE = "mmanager/modelserver:latest"
ROOT = Path(__file__).resolve().parents[1]
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/local/bin/busybox")

_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY www /www
RUN ["/bin/busybox", "--install", "-s", "/bin"]
EXPOSE 5000
ENV MODEL_NAME=example
LABEL org.mmanager.example.revision={revision}
# sh stays PID 1 and exits on SIGTERM, so `docker stop` is prompt (httpd as PID 1 would ignore it).
CMD ["/bin/sh", "-c", "trap 'exit 0' TERM INT; echo \\"model service $MODEL_NAME listening on 5000\\"; httpd -f -v -p 5000 -h /www & wait"]
"""
# Bump when the image changes, so machines that built an older one rebuild it.
REVISION = "2"


def find_static_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.exists() and _is_static(path):
            return path
    found = shutil.which("busybox")
    if found and _is_static(Path(found)):
        return Path(found)
    raise FileNotFoundError(
        "a statically linked busybox is needed to build the example image: "
        "`apt-get install busybox-static`"
    )


def _is_static(path: Path) -> bool:
    """True for a 64-bit ELF without a PT_INTERP segment, i.e. one that needs no dynamic loader."""
    data = path.read_bytes()[: 1 << 16]
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        if int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") == 3:
            return False
    return True


def _context(busybox: Path) -> io.BytesIO:
    files = {
        "Dockerfile": _DOCKERFILE.format(revision=REVISION).encode(),
        "www/health": b'{"status": "healthy"}\n',
        "www/index.html": b"<h1>mManager example model service</h1>\n",
        "www/model/info": json.dumps(
            {"name": "example", "version": "1.0.0", "tasks": ["echo"]}
        ).encode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        tar.add(str(busybox), arcname="busybox")
    buf.seek(0)
    return buf


def build_example_image(client: docker.DockerClient | None = None, tag: str = EXAMPLE_IMAGE) -> str:
    """Build the example image unless it is there already; return its tag."""
    client = client or docker.from_env()
    try:
        if client.images.get(tag).labels.get("org.mmanager.example.revision") == REVISION:
            return tag
    except docker.errors.ImageNotFound:
        pass
    client.images.build(fileobj=_context(find_static_busybox()), custom_context=True, tag=tag, rm=True)
    return tag


def build_modelserver_image() -> str:
    """Build the reference model service's image unless an image of the same sources is there; its tag."""
    subprocess.run(["bash", str(ROOT / "scripts/build-modelserver-image.sh")], check=True)
    return MODELSERVER_IMAGE
