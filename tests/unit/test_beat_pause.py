"""When a controller beats again (mmanager.wire.beat_pause): on its cadence when answered; after a jittered,
growing backoff when not, so that a fleet whose beats all went unanswered at once does not resend them all at
once; never sooner than a shedding hub's Retry-After."""

from __future__ import annotations

import random

import pytest

from mmanager.wire import FIRST_RETRY, beat_pause, retry_after_seconds

LOW, HIGH = (lambda: 0.0), (lambda: 0.999999)


def test_an_answered_beat_keeps_the_cadence_and_a_late_one_goes_at_once() -> None:
    assert beat_pause(1.5, 2.0, 0, answered=True) == 1.5
    assert beat_pause(-0.7, 2.0, 0, answered=True) == 0.0


@pytest.mark.parametrize("answered", [True, False])
def test_a_beat_that_timed_out_is_not_resent_at_once(answered: bool) -> None:
    # Sent 3 s ago with a 2 s interval: the cadence says "at once"; the backoff says otherwise.
    first = [beat_pause(-1.0, 2.0, 1, answered=answered, rand=r) for r in (LOW, HIGH)]
    assert first == pytest.approx([FIRST_RETRY / 2, FIRST_RETRY])
    # Doubling for each failure in a row, up to the interval.
    assert beat_pause(-1.0, 2.0, 3, answered=answered, rand=HIGH) == pytest.approx(4 * FIRST_RETRY)
    assert [beat_pause(-1.0, 2.0, k, answered=answered, rand=r) for k in (5, 500) for r in (LOW, HIGH)] == (
        pytest.approx([1.0, 2.0, 1.0, 2.0]))


def test_the_jitter_spreads_a_fleet_over_half_the_backoff_and_more() -> None:
    rng = random.Random(7)
    pauses = sorted(beat_pause(-1.0, 2.0, 6, answered=False, rand=rng.random) for _ in range(10_000))
    assert 1.0 <= pauses[0] < 1.01 and 1.99 < pauses[-1] <= 2.0
    # Spread evenly, not bunched at either end.
    assert 0.45 < pauses[len(pauses) // 2] - 1.0 < 0.55


def test_a_failure_waits_for_the_cadence_once_answered_and_not_before() -> None:
    # A hub down (connection refused at once): an answered controller keeps its interval...
    assert beat_pause(1.9, 2.0, 1, answered=True, rand=HIGH) == 1.9
    # ...one never answered (started before its hub) tries again sooner, as it takes no work until then.
    assert beat_pause(1.9, 2.0, 1, answered=False, rand=HIGH) == pytest.approx(FIRST_RETRY)


def test_a_shedding_hubs_retry_after_is_honoured_with_up_to_a_fifth_more() -> None:
    assert beat_pause(-1.0, 2.0, 1, answered=False, retry_after=10, rand=LOW) == 10
    assert beat_pause(-1.0, 2.0, 1, answered=False, retry_after=10, rand=HIGH) == pytest.approx(12)
    # Never shorter than what the backoff or the cadence says.
    assert beat_pause(1.5, 2.0, 1, answered=True, retry_after=0, rand=LOW) == 1.5


@pytest.mark.parametrize(("status", "value", "seconds"), [
    (503, "10", 10.0), (429, "2.5", 2.5), (503, "999999", 3600.0), (503, None, None), (500, "10", None),
    (503, "Wed, 21 Oct 2026 07:28:00 GMT", None), (503, "-1", None), (503, "nan", None), (503, "inf", None),
])
def test_retry_after_is_read_from_503_and_429_only(status: int, value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(status, value, 3600.0) == seconds
