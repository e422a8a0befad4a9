"""Projectors: choosing, storing and applying a low-rank subspace of a gradient."""

from lowmem_optim.projection.base import PROJ_TYPES, MatrixProjector, Projector, projection_sides
from lowmem_optim.projection.svd import SVDProjector

PROJECTORS: dict[str, type] = {"svd": SVDProjector}

__all__ = ["Projector", "MatrixProjector", "SVDProjector", "PROJECTORS", "PROJ_TYPES", "projection_sides"]
