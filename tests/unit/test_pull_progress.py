"""A pull's progress folded from Docker's streamed pull events (controller.pulls), as a real pull sends them."""

from __future__ import annotations

from controller.pulls import Pulls

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


def test_a_later_pull_of_the_same_image_is_the_one_shown() -> None:
    pulls = Pulls()
    first, second = pulls.begin("x:1"), pulls.begin("x:1")
    second.event({"status": "Pulling fs layer", "id": "l"})
    pulls.end(first)  # the first one's end does not hide the second
    [now] = pulls.snapshot()
    assert now.layers_total == 1
    pulls.end(second)
    assert pulls.snapshot() == []
