"""A tiny image for golden-inference probe tests: the example image's static busybox, whose ``httpd``
serves ``/health`` and answers ``POST /cgi-bin/predict`` with ``{"data": {"prediction": $PREDICTION}}``
(0.4123 unless the container's environment says otherwise), so a "corrupted model" is one env var away;
a file ``/prediction`` in the container, read at each start as a model's weights are, overrides it from the
next start on (``corrupt_on_restart``).
Built locally like the example image (examples/images.py); never pulled."""

from __future__ import annotations

import io
import tarfile

import docker

from examples.images import find_static_busybox

PROBE_IMAGE = "mmanager/probe-test:latest"
REVISION = "2"
GOOD = 0.4123

_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY www /www
RUN ["/bin/busybox", "--install", "-s", "/bin"]
EXPOSE 5000
ENV PREDICTION={good}
LABEL org.mmanager.probe-test.revision={revision}
CMD ["/bin/sh", "-c", "trap 'exit 0' TERM INT; [ -f /prediction ] && export PREDICTION=$(cat /prediction); httpd -f -p 5000 -h /www & wait"]
"""
# httpd hands the CGI its own environment: PREDICTION is the container's.
_PREDICT = """#!/bin/sh
cat > /dev/null
echo "Content-Type: application/json"
echo ""
echo "{\\"success\\": true, \\"data\\": {\\"prediction\\": $PREDICTION, \\"label\\": \\"promoter\\"}}"
"""


def _context() -> io.BytesIO:
    files = {
        "Dockerfile": (_DOCKERFILE.format(good=GOOD, revision=REVISION).encode(), 0o644),
        "www/health": (b'{"status": "healthy"}\n', 0o644),
        "www/cgi-bin/predict": (_PREDICT.encode(), 0o755),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
        tar.add(str(find_static_busybox()), arcname="busybox")
    buf.seek(0)
    return buf


def build_probe_image(client: docker.DockerClient) -> str:
    """Build the image unless it is there already; return its tag."""
    try:
        if client.images.get(PROBE_IMAGE).labels.get("org.mmanager.probe-test.revision") == REVISION:
            return PROBE_IMAGE
    except docker.errors.ImageNotFound:
        pass
    client.images.build(fileobj=_context(), custom_context=True, tag=PROBE_IMAGE, rm=True)
    return PROBE_IMAGE


def corrupt_on_restart(container: docker.models.containers.Container, prediction: float) -> None:
    """Make a running container answer ``prediction`` from its next start on (its weights changed on disk)."""
    code, output = container.exec_run(["/bin/sh", "-c", f"echo {prediction} > /prediction"])
    assert code == 0, output
