"""The seeded scale benchmarks' small versions (issue 6): ``bench.hub_memory``, ``bench.mass_failover`` and
``bench.first_beats``
run their own code against a hub served on a real port (in process, on real PostgreSQL), over a database
seeded by ``bench.seed`` with 100 services on 20 simulated controllers. Correctness only, no timing:

- the seed is consistent: once the controllers beat, the hub finds every service where the database
  says, and over a few heartbeat intervals records no operation, changes no service and orders no
  container stopped; every API list and ``/metrics`` answers with every seeded row and controller;
- a fleet's first beats, all at once: every controller beats, none is taken for lost, nothing moves;
- after 2 controllers die at once, every one of their services runs on a live controller at a new
  epoch, as the one copy the simulator holds there; no service is left on a dead controller and no
  other service moved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from bench import first_beats, hub_memory, mass_failover
from bench.seed import Seeded, seed
from bench.sim import SimOptions, Simulator
from hub.config import HubSettings
from hub.db import Database
from tests.support.net import free_port
from tests.support.served import served_hub

pytestmark = pytest.mark.slow

KEY = "bench-key-" + "x" * 32
CONTROLLERS, SERVICES = 20, 100


@dataclass
class Fleet:
    hub_url: str
    seeded: Seeded
    options: SimOptions

    def simulator(self) -> Simulator:
        return Simulator(replace(self.options, hub_url=self.hub_url, containers=self.seeded.containers))


@pytest.fixture
async def fleet(db: Database) -> AsyncIterator[Fleet]:
    """The database seeded first, then a hub started on it (as after a restart of a loaded hub)."""
    options = SimOptions(count=CONTROLLERS, key=KEY, port=free_port(), id_prefix="scale", ramp=0.2,
                         healthy_after=0.1)
    seeded = await seed(db.url, options, SERVICES, migrate=False)
    settings = HubSettings(database_url=db.url, api_key=KEY, heartbeat_interval=0.5, heartbeat_grace=2,
                           rate_limit=0)
    async with served_hub(settings) as url:
        yield Fleet(url, seeded, options)


async def test_seeded_fleet_beats_without_churn_and_reads_whole(fleet: Fleet, db: Database) -> None:
    sim = fleet.simulator()
    run = await hub_memory.measure(fleet.hub_url, db.url, sim, fleet.seeded, seconds=3.0, beat_timeout=30)
    assert run["churn"] == {"new_operations": 0, "services_changed": 0, "services_gone": 0,
                            "registry_rows_changed": 0, "registry_not_running": 0}
    assert run["sim"]["stops_applied"] == 0 and run["sim"]["errors"] == 0
    assert run["sim"]["containers"] == SERVICES
    api = run["api"]
    assert api["services"]["items"] == SERVICES
    assert api["controllers"]["items"] == CONTROLLERS
    assert api["containers"]["items"] == SERVICES
    assert api["metrics"]["bytes"] > 0
    # One up series per controller at least, whatever else /metrics carries.
    assert api["metrics"]["series"] >= CONTROLLERS


async def test_mass_failover_moves_every_affected_service_once(fleet: Fleet, db: Database) -> None:
    sim = fleet.simulator()
    run = await mass_failover.measure(fleet.hub_url, db.url, sim, fleet.seeded, 2, beat_timeout=30,
                                      recover_timeout=60)
    dead = set(mass_failover.victims(fleet.seeded, 2))
    affected = sum(1 for cid in fleet.seeded.placement.values() if cid in dead)
    assert run["killed"] == 2 and run["affected"] == affected == SERVICES * 2 // CONTROLLERS
    assert run["recovered"] == affected and run["not_recovered"] == 0
    assert run["problems"] == 0, run["examples"]
    assert run["controllers_marked_lost"] == 2
    assert run["services_in_database"] == SERVICES
    assert run["copies_on_live_controllers"] == SERVICES
    assert run["operations"] == {"failover:succeeded": affected}


async def test_a_fleet_starting_at_once_all_beats_and_nothing_moves(fleet: Fleet, db: Database) -> None:
    run = await first_beats.measure(db.url, fleet.simulator(), fleet.seeded, seconds=30)
    assert run["all_beating_after_s"] is not None, run
    assert run["beating_at_end"] == CONTROLLERS and run["failed_beats"] == {}
    # No controller was taken for lost while the fleet beat: no failover, no move. (Counted by the run
    # itself: a count after it stopped the fleet raced the hub's grace, 2 s here, and lost when the
    # simulator took that long to stop.)
    assert run["operations"] == 0
