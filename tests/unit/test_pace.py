"""The heartbeat pace (hub.services.pace): a fleet too big for MMANAGER_HEARTBEAT_MAX_RATE is told a
longer interval and grace; when it shrinks, silence is judged by the longer grace until every
controller can have heard the shorter one."""

from __future__ import annotations

from hub.config import HubSettings
from hub.services.pace import HeartbeatPace


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pace(max_rate: float, clock: Clock | None = None) -> HeartbeatPace:
    settings = HubSettings(api_key="k" * 32, heartbeat_interval=2, heartbeat_grace=6, heartbeat_max_rate=max_rate)
    return HeartbeatPace(settings, clock or Clock())


def test_a_fleet_within_the_rate_beats_at_the_configured_interval() -> None:
    p = pace(250)
    p.update(500)  # 500 controllers every 2 s: exactly 250 a second
    assert (p.interval, p.grace, p.detection_grace, p.stretch) == (2, 6, 6, 1)


def test_a_bigger_fleet_is_stretched_to_the_rate_interval_and_grace_alike() -> None:
    p = pace(250)
    p.update(10_000)
    assert p.interval == 40 and p.grace == 120 and p.stretch == 20
    # 10,000 controllers / 40 s = 250 a second; in steps of a tenth of the configured interval.
    p.update(10_001)
    assert p.interval == 40.2 and p.grace == 40.2 * 3


def test_no_rate_no_stretch() -> None:
    p = pace(0)
    p.update(1_000_000)
    assert (p.interval, p.grace) == (2, 6)


def test_when_the_fleet_shrinks_silence_is_judged_by_the_old_grace_until_it_has_passed() -> None:
    clock = Clock()
    p = pace(250, clock)
    p.update(5_000)  # 20 s, grace 60 s
    p.update(100)  # back to 2 s, 6 s: answered at once
    assert (p.interval, p.grace) == (2, 6)
    # A controller told 20 s a moment ago beats again only within 20 s: not lost after 6.
    assert p.detection_grace == 60
    clock.now += 59.9
    assert p.detection_grace == 60
    clock.now += 0.2
    assert p.detection_grace == 6


def test_growing_takes_effect_at_once_for_detection_too() -> None:
    p = pace(250)
    p.update(100)
    p.update(1_000)
    assert p.interval == 4 and p.detection_grace == 12
