"""Tensor primitives. Importing this package fills `OPS` (without importing torch)."""

from . import (  # noqa: F401  (registration side effects)
    adapters,
    arith,
    calibrated,
    consensus,
    geometry,
    interp,
    layout,
    masks,
    prune,
    selection,
    sparsify,
    stat_weighted,
    subspace,
    svd,
)
from .registry import OPS, OpDef, ParamSpec, Tensor, op

__all__ = ["OPS", "OpDef", "ParamSpec", "Tensor", "op"]
