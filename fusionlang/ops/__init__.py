"""Tensor primitives. Importing this package fills `OPS` (without importing torch)."""

from . import arith, consensus, interp, layout, masks, sparsify, stat_weighted, subspace, svd  # noqa: F401  (registration side effects)
from .registry import OPS, OpDef, ParamSpec, Tensor, op

__all__ = ["OPS", "OpDef", "ParamSpec", "Tensor", "op"]
