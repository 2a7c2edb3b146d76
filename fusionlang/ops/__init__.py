"""Tensor primitives. Importing this package fills `OPS` (without importing torch)."""

from . import adapters, arith, consensus, interp, layout, sparsify, stat_weighted, svd  # noqa: F401  (registration side effects)
from .registry import OPS, OpDef, ParamSpec, Tensor, op

__all__ = ["OPS", "OpDef", "ParamSpec", "Tensor", "op"]
