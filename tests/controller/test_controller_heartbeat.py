"""Heartbeats to the hub, stop orders and the sync guard, over the in-memory FakeRuntime.

The hub is a small fake behind an ``httpx.MockTransport`` handed to the
controller app: it records every heartbeat (validated as the wire model) and
answers what each test tells it to, or fails the way a real hub can.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from controller.fake import FakeRuntime
from controller.heartbeat import HeartbeatAgent
from controller.inventory import images_version
from controller.spec import build_spec
from controller.sync import SyncGuard
from examples.images import EXAMPLE_IMAGE
from mmanager.wire import ContainerCreate, Heartbeat, HeartbeatAnswer, HeldImage, StopOrder
from tests.controller.conftest import KEY, Ctl, StartController
from tests.support.poll import eventually

HUB = "http://hub.test"


@dataclass
class FakeHub:
    interval: float = 0.05
    grace: float = 5.0
    # ok | error (500) | unauthorized (401) | garbage (200, not JSON) | wrong (JSON, not an answer) | down
    # | shed (503 with Retry-After: 1, as a hub with too many beats waiting answers)
    # | small (413 for a beat that lists images, as a hub whose body limit they pass)
    mode: str = "ok"
    # Seconds to wait before answering, and a gate that holds every answer until set.
    delay: float = 0.0
    gate: asyncio.Event | None = None
    orders: Callable[[Heartbeat], list[StopOrder]] = lambda beat: []
    # Echo the beats' image set version (a hub that took their list), or none (one that never did).
    hold_images: bool = False
    beats: list[Heartbeat] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        beat = Heartbeat.model_validate_json(request.content)
        self.beats.append(beat)
        self.received.append(time.monotonic())
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "shed":
            return httpx.Response(503, headers={"Retry-After": "1"},
                                  json={"error": {"code": "OVERLOADED", "message": "beat again later"}})
        if self.mode == "error":
            return httpx.Response(500, json={"error": {"code": "INTERNAL_ERROR", "message": "boom"}})
        if self.mode == "unauthorized":
            return httpx.Response(401, json={"error": {"code": "CONTROLLER_KEY_INVALID", "message": "bad key"}})
        if self.mode == "garbage":
            return httpx.Response(200, text="<html>not a heartbeat answer</html>")
        if self.mode == "wrong":
            return httpx.Response(200, json={"interval": "soon"})
        if self.mode == "small" and beat.images:
            return httpx.Response(413, json={"error": {"code": "PAYLOAD_TOO_LARGE", "message": "too large"}})
        answer = HeartbeatAnswer(interval=self.interval, grace=self.grace, stop=self.orders(beat),
                                 images_version=beat.images_version if self.hold_images else None)
        return httpx.Response(200, json=answer.model_dump(mode="json"))

    def transport(self) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(self.handle)


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
async def hub_ctl(start_fake: StartController, hub: FakeHub) -> Ctl:
    return await start_fake(hub_transport=hub.transport(), hub_url=HUB, controller_url="http://ctl.test:8001")


def agent(ctl: Ctl) -> HeartbeatAgent:
    return ctl.app.state.heartbeat


def synced(ctl: Ctl) -> bool:
    return ctl.app.state.containers.sync.in_sync


async def create(ctl: Ctl, **body: object) -> str:
    response = await ctl.create(EXAMPLE_IMAGE, **body)
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


def assert_not_synced(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "CONTROLLER_NOT_SYNCED"
    assert "heartbeat" in error["message"]
    assert response.headers["retry-after"]


async def test_heartbeats_carry_every_managed_container(hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime) -> None:
    await eventually(lambda: synced(hub_ctl), what="first round trip")
    running = await create(hub_ctl, service_id="svc-a", epoch=1, ports={"5000/tcp": None})
    stopped = await create(hub_ctl, service_id="svc-b", epoch=2)
    await hub_ctl.client.post(f"/containers/{stopped}/stop", params={"timeout": 0})
    # A container of another controller on the same engine is not ours to report.
    foreign = ContainerCreate(image=EXAMPLE_IMAGE, service_id="svc-x", epoch=1)
    fake.add_container(build_spec(foreign, server_id="someone-else", publish_ip=""))

    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 1, what="two more heartbeats")
    beat = hub.beats[-1]
    assert (beat.server_id, beat.url, beat.server_type) == ("fake-ctl", "http://ctl.test:8001", "cpu")
    assert [b.sequence for b in hub.beats] == list(range(1, len(hub.beats) + 1))
    assert beat.health.server_id == "fake-ctl" and beat.health.status == "healthy"
    assert beat.health.containers.running == 1 and beat.health.containers.managed == 2
    by_id = {c.container_id: c for c in beat.containers}
    assert set(by_id) == {running, stopped}
    assert (by_id[running].service_id, by_id[running].epoch, by_id[running].state) == ("svc-a", 1, "running")
    assert (by_id[stopped].service_id, by_id[stopped].epoch, by_id[stopped].state) == ("svc-b", 2, "exited")
    assert by_id[running].ports["5000/tcp"] >= 40000
    for c in beat.containers:
        assert c.health == "unknown" and c.health_restarts == 0
        assert 0 <= c.age_seconds < 30
        assert c.name

    request = hub.requests[-1]
    assert request.method == "POST"
    assert request.url == httpx.URL(f"{HUB}/api/controllers/fake-ctl/heartbeat")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"


async def test_a_stop_order_removes_that_container_and_only_it(
    hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.heartbeat")
    await eventually(lambda: synced(hub_ctl), what="first round trip")
    stale = await create(hub_ctl, service_id="svc-a", epoch=1)
    kept = await create(hub_ctl, service_id="svc-b", epoch=1)
    other_epoch = await create(hub_ctl, service_id="svc-a", epoch=2)

    hub.orders = lambda beat: (
        [
            StopOrder(container_id=c.container_id, service_id=c.service_id, epoch=c.epoch, reason="stale_epoch")
            for c in beat.containers
            if c.container_id == stale
        ]
        + [StopOrder(container_id="f" * 64, service_id="svc-gone", epoch=3, reason="orphan")]
    )
    await eventually(lambda: stale not in fake.containers, what="the stale copy removed")
    assert set(fake.containers) == {kept, other_epoch}
    assert fake.containers[kept].status == "running"

    # Orders for containers already gone do not keep the controller out of sync.
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 2, what="more heartbeats")
    assert synced(hub_ctl)
    await create(hub_ctl, service_id="svc-c", epoch=1)
    removed = [r for r in caplog.records if "removed container" in r.getMessage()]
    assert removed and removed[0].levelno == logging.INFO
    assert stale[:12] in removed[0].getMessage() and "stale_epoch" in removed[0].getMessage()


async def test_no_create_before_the_first_round_trip(hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime) -> None:
    hub.gate = asyncio.Event()
    await eventually(lambda: hub.beats, what="the first heartbeat sent")
    assert_not_synced(await hub_ctl.create(EXAMPLE_IMAGE, service_id="svc-a", epoch=1))
    # Neither does an old container start or restart; stopping and removing stay allowed.
    old = fake.add_container(build_spec(ContainerCreate(image=EXAMPLE_IMAGE), server_id="fake-ctl", publish_ip=""))
    assert_not_synced(await hub_ctl.client.post(f"/containers/{old.id}/restart"))
    assert (await hub_ctl.client.post(f"/containers/{old.id}/stop", params={"timeout": 0})).status_code == 200
    assert_not_synced(await hub_ctl.client.post(f"/containers/{old.id}/start"))
    assert (await hub_ctl.client.delete(f"/containers/{old.id}")).status_code == 200
    assert fake.containers == {}

    hub.gate.set()
    await eventually(lambda: synced(hub_ctl), what="the first round trip")
    await create(hub_ctl, service_id="svc-a", epoch=1)


async def test_no_create_once_the_grace_passes_without_a_round_trip(hub_ctl: Ctl, hub: FakeHub) -> None:
    hub.grace = 0.3
    await eventually(lambda: synced(hub_ctl) and agent(hub_ctl).sync.grace == 0.3, what="synced with grace 0.3")
    await create(hub_ctl)
    hub.mode = "error"
    await eventually(lambda: not synced(hub_ctl), within=2, what="the guard closing")
    assert_not_synced(await hub_ctl.create(EXAMPLE_IMAGE))
    hub.mode = "ok"
    await eventually(lambda: synced(hub_ctl), what="synced again")
    await create(hub_ctl)


async def test_a_frozen_controller_removes_its_stale_copies_before_new_work(
    hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime
) -> None:
    """Like SIGSTOP then SIGCONT: the whole process (here: the event loop) stops for longer than the grace."""
    hub.grace = 0.3
    await eventually(lambda: synced(hub_ctl) and agent(hub_ctl).sync.grace == 0.3, what="synced with grace 0.3")
    stale = await create(hub_ctl, service_id="svc-a", epoch=1)

    # Meanwhile the hub moves svc-a elsewhere; once the controller beats again it is told to stop its copy.
    failed_over_at = time.monotonic() + 0.2
    hub.orders = lambda beat: [
        StopOrder(container_id=c.container_id, service_id=c.service_id, epoch=c.epoch, reason="stale_epoch")
        for c in beat.containers
        if c.container_id == stale and time.monotonic() > failed_over_at
    ]
    hub.delay = 0.2
    time.sleep(0.5)  # frozen: no task of this process runs

    # The first request after waking is refused while the heartbeat that cleans up is still out.
    assert stale in fake.containers
    assert_not_synced(await hub_ctl.create(EXAMPLE_IMAGE, service_id="svc-b", epoch=1))
    await eventually(lambda: synced(hub_ctl), what="synced after waking")
    assert stale not in fake.containers
    await create(hub_ctl, service_id="svc-b", epoch=1)


async def test_the_interval_comes_from_the_hub(start_fake: StartController, hub: FakeHub) -> None:
    hub.interval = 0.3
    ctl = await start_fake(hub_transport=hub.transport(), hub_url=HUB)
    # The first goes out at once, the next after the hub's 0.3 s rather than the initial 2 s
    # (bounds loose enough for a busy machine, tight enough to tell 0.3 s from 2 s).
    await eventually(lambda: hub.beats, within=1.5, what="the first heartbeat, at once")
    await eventually(lambda: len(hub.beats) >= 4, what="four heartbeats")
    gaps = [b - a for a, b in zip(hub.received, hub.received[1:], strict=False)]
    assert all(0.25 <= gap < 1.5 for gap in gaps), gaps
    assert agent(ctl).interval == 0.3

    hub.interval = 0.05
    await eventually(lambda: agent(ctl).interval == 0.05, what="the new interval adopted")
    count = len(hub.beats)
    # At 0.3 s there would be at most 4 in a second.
    await eventually(lambda: len(hub.beats) - count >= 5, within=1.0, what="five beats within a second")


async def test_a_controller_started_before_its_hub_joins_soon_after_it(start_fake: StartController) -> None:
    hub = FakeHub(mode="down")
    ctl = await start_fake(hub_transport=hub.transport(), hub_url=HUB, controller_url="http://ctl.test:8001")
    beats = agent(ctl)
    assert beats.interval == 2.0  # the configured interval: no answer has named another yet
    await eventually(lambda: beats.failures >= 2, what="two failed first heartbeats")
    assert_not_synced(await ctl.create(EXAMPLE_IMAGE))
    hub.mode = "ok"
    # Well before the next beat at its 2 s cadence: the first one is retried sooner (0.25 s, doubling).
    await eventually(lambda: synced(ctl), within=1.5, what="the first round trip, before the 2 s cadence")
    assert hub.beats


async def test_a_hub_that_sheds_beats_is_left_alone_as_long_as_it_asks(hub_ctl: Ctl, hub: FakeHub) -> None:
    await eventually(lambda: synced(hub_ctl), what="first round trip")
    hub.mode = "shed"
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) >= count + 3, within=10, what="three beats refused")
    shed = hub.received[count:]
    # The interval is 0.05 s: without the Retry-After there would be some forty beats in two seconds.
    gaps = [b - a for a, b in zip(shed, shed[1:], strict=False)]
    assert all(1.0 <= gap < 2.5 for gap in gaps), gaps
    hub.mode = "ok"
    await eventually(lambda: agent(hub_ctl).failures == 0, within=5, what="beats answered again")


@pytest.mark.parametrize("mode", ["error", "unauthorized", "garbage", "wrong", "down"])
async def test_a_failing_hub_does_not_stop_the_heartbeats(
    hub_ctl: Ctl, hub: FakeHub, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="controller.heartbeat")
    await eventually(lambda: synced(hub_ctl), what="first round trip")
    hub.mode = mode
    beats = agent(hub_ctl)
    sent = beats.sequence
    await eventually(lambda: beats.failures >= 5, what="five failed heartbeats")
    assert not beats._task.done()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # Logged once, not once per beat.
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "heartbeat to http://hub.test failed" in warnings[0].getMessage()

    hub.mode = "ok"
    await eventually(lambda: beats.failures == 0, what="recovery")
    assert beats.sequence > sent + 5
    assert any("again after" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    await eventually(lambda: synced(hub_ctl), what="synced again")


async def test_without_a_hub_url_nothing_waits_for_heartbeats(fake_ctl: Ctl) -> None:
    assert fake_ctl.app.state.heartbeat is None
    await create(fake_ctl, service_id="svc-a", epoch=1)


async def test_the_agent_stops_with_the_app(fake: FakeRuntime, hub: FakeHub) -> None:
    from controller.app import create_app
    from tests.controller.conftest import make_settings

    app = create_app(make_settings("fake-ctl", hub_url=HUB), fake, hub_transport=hub.transport())
    async with app.router.lifespan_context(app):
        await eventually(lambda: hub.beats, what="a heartbeat")
        task = app.state.heartbeat._task
        probes = app.state.prober._task
    assert task.done() and probes.done()
    count = len(hub.beats)
    await asyncio.sleep(0.2)
    assert len(hub.beats) == count


def test_the_sync_guard_counts_from_when_the_round_trip_began() -> None:
    now = [100.0]
    guard = SyncGuard(required=True, clock=lambda: now[0])
    assert not guard.in_sync and guard.age() is None
    guard.synced(began=99.0, grace=2.0)
    assert guard.in_sync and guard.grace == 2.0
    now[0] = 101.5
    assert not guard.in_sync
    # An older round trip finishing late does not make the controller look fresher.
    guard.synced(began=98.0, grace=2.0)
    assert not guard.in_sync
    guard.synced(began=101.0, grace=2.0)
    assert guard.in_sync
    assert SyncGuard(required=False).in_sync


async def test_a_slow_or_absent_docker_does_not_stop_the_heartbeats(
    hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    await eventually(lambda: synced(hub_ctl), what="first round trip")
    container_id = await create(hub_ctl, service_id="svc-a", epoch=1)
    await eventually(lambda: any(b.containers for b in hub.beats), what="a heartbeat with the container")

    # Docker hangs: beats still go out on time, saying so, with the last list Docker gave.
    monkeypatch.setattr("controller.heartbeat.DOCKER_BUDGET", 0.1)

    async def hang() -> None:
        await asyncio.sleep(30)

    monkeypatch.setattr(fake, "host_info", hang)
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 3, what="heartbeats while Docker hangs")
    beat = hub.beats[-1]
    assert (beat.health.status, beat.health.docker) == ("unhealthy", False)
    assert "did not answer" in (beat.health.error or "")
    assert [c.container_id for c in beat.containers] == [container_id]

    # Docker gone: the same.
    monkeypatch.undo()
    fake.docker_up = False
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 3, what="heartbeats while Docker is down")
    beat = hub.beats[-1]
    assert (beat.health.status, beat.health.docker) == ("unhealthy", False)
    assert [c.container_id for c in beat.containers] == [container_id]
    fake.docker_up = True


async def test_beats_go_on_to_the_next_hub_replica(start_fake: StartController) -> None:
    first, second = FakeHub(), FakeHub()
    hubs = {"hub1.test": first, "hub2.test": second}

    async def route(request: httpx.Request) -> httpx.Response:
        return await hubs[request.url.host].handle(request)

    ctl = await start_fake(hub_transport=httpx.MockTransport(route), hub_url="http://hub1.test, http://hub2.test/")
    await eventually(lambda: len(first.beats) >= 3, what="beats to the first hub")
    assert not second.beats

    first.mode = "down"
    await eventually(lambda: len(second.beats) >= 3, what="beats to the second hub")
    assert second.requests[0].url == httpx.URL("http://hub2.test/api/controllers/fake-ctl/heartbeat")
    # No beat was lost on the way: every sequence number reached one hub or the other.
    sequences = sorted(b.sequence for b in [*first.beats, *second.beats])
    assert sequences == list(range(1, sequences[-1] + 1))
    assert synced(ctl) and agent(ctl).failures == 0

    # It stays with the replica that answers.
    first.mode = "ok"
    count, seen = len(first.beats), len(second.beats)
    await eventually(lambda: len(second.beats) >= seen + 3, what="more beats to the second hub")
    assert len(first.beats) == count
    assert agent(ctl).hub_url == "http://hub2.test"


async def test_images_travel_only_when_the_hub_lacks_their_version(hub_ctl: Ctl, hub: FakeHub,
                                                                    fake: FakeRuntime) -> None:
    # A hub that does not echo the version gets the list with every beat.
    # The listing is taken in the background: the beats before it say nothing of images.
    await eventually(lambda: len([b for b in hub.beats if b.images_version]) >= 2, what="two heartbeats with images")
    listed = [b for b in hub.beats if b.images_version]
    first = listed[0]
    assert [i.tags for i in first.images or []] == [[EXAMPLE_IMAGE]]
    assert all(b.images is not None for b in listed[:2])
    assert all(b.images is None for b in hub.beats if not b.images_version)
    # One that holds it gets the version alone.
    hub.hold_images = True
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 1, what="two more heartbeats")
    assert hub.beats[-1].images is None and hub.beats[-1].images_version == first.images_version
    # A pull through this controller: the next beat lists the new set, under a new version.
    fake.images["lab/new:1"] = "sha256:" + "1" * 64
    fake.pulls_done += 1
    await eventually(lambda: hub.beats[-1].images_version != first.images_version, what="a beat with the new set")
    changed = next(b for b in hub.beats if b.images_version not in (None, first.images_version))
    assert changed.images is not None and {t for i in changed.images for t in i.tags} == {EXAMPLE_IMAGE, "lab/new:1"}


async def test_a_slow_image_listing_does_not_delay_the_beats(hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    await eventually(lambda: hub.beats and hub.beats[-1].images is not None, what="a beat with the images")
    listed = fake.held_images
    release = asyncio.Event()
    calls = 0

    async def slow() -> list[HeldImage]:
        nonlocal calls
        calls += 1
        await release.wait()
        return await listed()

    monkeypatch.setattr(fake, "held_images", slow)
    fake.images["lab/new:1"] = "sha256:" + "1" * 64
    fake.pulls_done += 1
    await eventually(lambda: calls == 1, what="the listing under way")
    # Beats go on at their cadence with the last listing, and the listing is not started again meanwhile.
    count = len(hub.beats)
    await eventually(lambda: len(hub.beats) > count + 5, what="beats while the listing hangs")
    assert calls == 1 and agent(hub_ctl).failures == 0
    assert {t for i in hub.beats[-1].images or [] for t in i.tags} == {EXAMPLE_IMAGE}
    assert all(b.health.docker for b in hub.beats[count:])
    release.set()
    await eventually(lambda: {t for i in hub.beats[-1].images or [] for t in i.tags} == {EXAMPLE_IMAGE, "lab/new:1"},
                     what="a beat with the new listing")


async def test_an_image_removal_lists_the_images_again(hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime) -> None:
    fake.images["lab/gone:1"] = "sha256:" + "2" * 64
    fake.pulls_done += 1
    await eventually(lambda: hub.beats and any(t == "lab/gone:1" for i in hub.beats[-1].images or [] for t in i.tags),
                     what="a beat with the image")
    await fake.remove_image("lab/gone:1", force=True)
    await eventually(lambda: hub.beats[-1].images is not None
                     and all(t != "lab/gone:1" for i in hub.beats[-1].images for t in i.tags),
                     what="a beat without the removed image")


async def test_more_images_than_the_cap_go_as_a_partial_list(hub_ctl: Ctl, hub: FakeHub, fake: FakeRuntime) -> None:
    agent(hub_ctl).images.max_images = 3
    for n in range(5):
        fake.images[f"lab/many:{n}"] = "sha256:" + str(n) * 64
    fake.pulls_done += 1
    await eventually(lambda: hub.beats and hub.beats[-1].images_partial, what="a beat with a partial list")
    beat = hub.beats[-1]
    assert beat.images is not None and len(beat.images) == 3
    assert beat.images_version == images_version(beat.images)


async def test_a_beat_too_large_for_the_hub_goes_again_without_the_images(hub_ctl: Ctl, hub: FakeHub) -> None:
    await eventually(lambda: synced(hub_ctl), what="first round trip")
    inventory = agent(hub_ctl).images
    limit = inventory.max_bytes
    count = len(hub.beats)
    hub.mode = "small"
    await eventually(lambda: any(b.images is None and b.images_version is None for b in hub.beats[count:]),
                     what="a beat without the images")
    assert inventory.max_bytes == limit // 2
    # That beat was answered: the controller stays in touch with a hub whose body limit its list passes.
    after = next(i for i, b in enumerate(hub.beats) if i >= count and b.images is None)
    assert len(hub.beats) > after
    hub.mode = "ok"
    await eventually(lambda: agent(hub_ctl).failures == 0 and hub.beats[-1].images is not None,
                     what="beats with the images again")
