"""Placement, as pure functions over an immutable view of the cluster."""

from hub.scheduler.placement import CandidateIndex, ControllerView, Placement, PlacementRequest, Rejection, place

__all__ = ["CandidateIndex", "ControllerView", "Placement", "PlacementRequest", "Rejection", "place"]
