"""The pre-pull loop pulls an image once per controller, however many services want it there: its pulls are
keyed by (controller, image), with a fake controller client and a plan given outright."""

import asyncio
from types import SimpleNamespace
from typing import Any

from hub.background.prefetch import Prefetcher
from hub.metrics import HubMetrics
from hub.scheduler.prefetch import PrefetchTarget
from hub.services.locality import ImageSets

IMAGE = "127.0.0.1:5000/lab/big:1"


class FakeClient:
    def __init__(self) -> None:
        self.pulls: list[tuple[str, str]] = []
        self.release = asyncio.Event()

    async def pull_image(self, controller_id: str, url: str, image: str, auth: Any) -> dict[str, Any]:
        self.pulls.append((controller_id, image))
        await self.release.wait()
        return {"id": "sha256:" + "1" * 64, "tags": [image], "size": 5}


async def test_two_services_with_one_image_pull_it_once_per_controller() -> None:
    client = FakeClient()
    settings = SimpleNamespace(prefetch_interval=30.0, sealer=None, prefetch_targets=1, prefetch_min_image_bytes=0,
                               model_sync_timeout=5.0)
    sets = ImageSets()
    sets.update("c1", "v1", [])
    placement = SimpleNamespace(urls={"c1": "http://c1", "c2": "http://c2"})
    prefetcher = Prefetcher(SimpleNamespace(is_sqlite=True), settings, client, placement, sets,  # type: ignore[arg-type]
                            HubMetrics())
    targets = [PrefetchTarget("svc-a", "c1", IMAGE, False), PrefetchTarget("svc-b", "c1", IMAGE, False),
               PrefetchTarget("svc-c", "c2", IMAGE, False)]

    async def plan() -> list[PrefetchTarget]:
        return targets

    prefetcher.plan = plan  # type: ignore[method-assign]
    await prefetcher.run_once()
    await asyncio.sleep(0)
    # A pass while the pulls run starts no other.
    await prefetcher.run_once()
    await asyncio.sleep(0)
    assert sorted(client.pulls) == [("c1", IMAGE), ("c2", IMAGE)]
    client.release.set()
    await asyncio.gather(*prefetcher._running.values())
    # Nor does one after they succeeded.
    await prefetcher.run_once()
    assert sorted(client.pulls) == [("c1", IMAGE), ("c2", IMAGE)] and not prefetcher._running
    assert sets.has("c1", IMAGE)
