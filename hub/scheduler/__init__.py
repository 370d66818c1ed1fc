"""Placement, as pure functions over an immutable view of the cluster (``placement``, ``reconcile``), and
the view placement decides from, kept from the database (``snapshot``)."""

from hub.scheduler.placement import CandidateIndex, ControllerView, Placement, PlacementRequest, Rejection, place

__all__ = ["CandidateIndex", "ControllerView", "Placement", "PlacementRequest", "Rejection", "place"]
