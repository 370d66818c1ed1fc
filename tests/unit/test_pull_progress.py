"""A pull's progress folded from Docker's streamed pull events (controller.pulls), as a real pull sends them;
and the hub's look at it never holding up the create's answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controller.pulls import Pulls
from hub.services.lifecycle import deploy
from mmanager.wire import ContainerCreate, ImagePullProgress

EVENTS = [
    {"status": "Pulling from lab/model", "id": "v1"},
    {"status": "Already exists", "progressDetail": {}, "id": "aaa"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "bbb"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "ccc"},
    {"status": "Waiting", "progressDetail": {}, "id": "ccc"},
    {"status": "Downloading", "progressDetail": {"current": 100, "total": 1000}, "id": "bbb"},
    {"status": "Downloading", "progressDetail": {"current": 600, "total": 1000}, "id": "bbb"},
    {"status": "Downloading", "progressDetail": {"current": 50, "total": 500}, "id": "ccc"},
]


def test_layers_and_bytes_as_docker_reports_them() -> None:
    pulls = Pulls()
    tracker = pulls.begin("lab/model:v1")
    for event in EVENTS:
        tracker.event(event)
    [now] = pulls.snapshot()
    assert (now.image, now.layers_done, now.layers_total) == ("lab/model:v1", 1, 3)
    assert (now.bytes_done, now.bytes_total) == (650, 1500)

    for event in ({"status": "Verifying Checksum", "progressDetail": {}, "id": "bbb"},
                  {"status": "Download complete", "progressDetail": {}, "id": "bbb"},
                  {"status": "Extracting", "progressDetail": {"current": 32768, "total": 1000}, "id": "bbb"},
                  {"status": "Pull complete", "progressDetail": {}, "id": "bbb"}):
        tracker.event(event)
    [now] = pulls.snapshot()
    assert (now.layers_done, now.bytes_done, now.bytes_total) == (2, 1050, 1500)

    tracker.event({"status": "Download complete", "progressDetail": {}, "id": "ccc"})
    tracker.event({"status": "Pull complete", "progressDetail": {}, "id": "ccc"})
    tracker.event({"status": "Digest: sha256:0123"})
    tracker.event({"status": "Status: Downloaded newer image for lab/model:v1"})
    [now] = pulls.snapshot()
    assert (now.layers_done, now.layers_total, now.bytes_done, now.bytes_total) == (3, 3, 1500, 1500)
    pulls.end(tracker)
    assert pulls.snapshot() == []


def test_two_pulls_of_the_same_image_are_both_shown() -> None:
    pulls = Pulls()
    first, second = pulls.begin("x:1"), pulls.begin("x:1")
    first.event({"status": "Pulling fs layer", "id": "a"})
    second.event({"status": "Pulling fs layer", "id": "l"})
    second.event({"status": "Pulling fs layer", "id": "m"})
    assert sorted(p.layers_total for p in pulls.snapshot()) == [1, 2]
    pulls.end(second)  # the second one's end does not hide the first, still running
    [now] = pulls.snapshot()
    assert (now.image, now.layers_total) == ("x:1", 1)
    pulls.end(first)
    assert pulls.snapshot() == []


async def test_the_creates_answer_does_not_wait_on_a_look_at_the_pull(monkeypatch: pytest.MonkeyPatch) -> None:
    """The create answers as soon as the controller does, even while a look at its pull is still in
    flight (that look is cancelled, not awaited)."""
    monkeypatch.setattr(deploy, "PULL_PROGRESS_AFTER", 0.0)
    looking, answered, never = asyncio.Event(), asyncio.Event(), asyncio.Event()
    created = object()

    async def create(controller_id: str, url: str, config: ContainerCreate) -> object:
        await looking.wait()  # the create answers only once a look at its pull is in flight
        answered.set()
        return created

    async def image_pulls(controller_id: str, url: str, timeout: float) -> list[ImagePullProgress]:
        looking.set()
        await never.wait()  # a slow controller: this look never ends by itself
        return []

    ctx = SimpleNamespace(client=SimpleNamespace(create=create, image_pulls=image_pulls))
    deployer = deploy.Deployer(ctx)  # type: ignore[arg-type]
    controller = SimpleNamespace(id="c1", url="http://c1:8001")
    op = SimpleNamespace(id="op1", details={})
    result = await asyncio.wait_for(
        deployer._create(controller, ContainerCreate(image="x:1"), op),  # type: ignore[arg-type]
        timeout=10)  # a bound for a failing run only: a hang is the failure
    assert result is created and answered.is_set()
