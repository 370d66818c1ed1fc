"""Placement, as pure functions over an immutable view of the cluster."""

from hub.scheduler.placement import ControllerView, Placement, PlacementRequest, Rejection, place

__all__ = ["ControllerView", "Placement", "PlacementRequest", "Rejection", "place"]
