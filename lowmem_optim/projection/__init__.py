"""Projectors: choosing, storing and applying a low-rank subspace of a gradient."""

from lowmem_optim.projection.base import PROJ_TYPES, MatrixProjector, projection_sides
from lowmem_optim.projection.dct import DCTProjector
from lowmem_optim.projection.random import RandomProjector
from lowmem_optim.projection.randomized_svd import RandomizedSVDProjector
from lowmem_optim.projection.svd import SVDProjector

PROJECTORS: dict[str, type] = {
    "svd": SVDProjector,
    "randomized_svd": RandomizedSVDProjector,
    "dct": DCTProjector,
    "random": RandomProjector,
}

__all__ = [
    "MatrixProjector",
    "SVDProjector",
    "RandomizedSVDProjector",
    "DCTProjector",
    "RandomProjector",
    "PROJECTORS",
    "PROJ_TYPES",
    "projection_sides",
]
