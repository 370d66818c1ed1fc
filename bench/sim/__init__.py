"""Simulated controllers for the scale benchmarks (issue 6): ``Simulator`` runs thousands of them in
one asyncio process, speaking the controller HTTP API and pushing heartbeats, without Docker."""

from bench.sim.controller import SimContainer, SimController
from bench.sim.simulator import SimOptions, Simulator, layout

__all__ = ["SimContainer", "SimController", "SimOptions", "Simulator", "layout"]
