"""Patch parallelism: mesh axes, the collectives (only here), and the per-layer plan with its stale state."""

from .mesh import CFG, PATCH, make_mesh, row_sharding, vary
from .plan import STALE, PatchPlan

__all__ = ["CFG", "PATCH", "make_mesh", "row_sharding", "vary", "STALE", "PatchPlan"]
