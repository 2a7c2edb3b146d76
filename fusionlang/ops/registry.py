"""The op registry: one decorator turns a typed Python function into a plan primitive.

The function signature *is* the op's parameter schema: tensor inputs are annotated
`Tensor` / `list[Tensor]`, everything else is a parameter the checker validates at
compile time (types, `Literal` choices, declared ranges). Importing this module does
not import torch, so `fusionlang check` stays fast.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin


class Tensor:
    """Annotation marker: one tensor (a model evaluated at one tensor name)."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # tensor | tensors | number | int | string | bool | numbers
    default: Any = inspect.Parameter.empty
    choices: tuple[str, ...] = ()
    optional: bool = False  # accepts none
    range: tuple[float | None, float | None] | None = None

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class OpDef:
    name: str
    fn: Callable
    params: tuple[ParamSpec, ...]
    kind: str = "map"  # map: per tensor group; reduce: across all groups (a phase boundary)
    public: bool = True  # callable by name from .fuse code
    inplace: bool = False  # may write its result into its first input when that is dead
    doc: str = ""
    ranges: dict = field(default_factory=dict)
    # A per-tensor statistic computable tile by tile: (partial(x_tile, offset, **params)
    # -> small Python value, finish([partials], **params) -> tensor), giving the same
    # value as `fn` on the whole tensor.
    tile_stat: tuple[Callable, Callable] | None = None
    # ops with several list parameters: check_shapes([[shape per input] per list]) -> a
    # problem ("...") or None, run at compile time on the inputs' shapes
    check_shapes: Callable | None = None
    # ops whose parameters constrain each other: check_values(params) -> None, or
    # (parameter, message, hint) for an E006 at the user's argument for that parameter
    # (params holds the checked values, and "_n": the length of the op's first tensor list)
    check_values: Callable | None = None
    # check_args([shape per tensor input], {param: value}) -> (param, problem, hint) or
    # None: a compile-time check of parameter values against each other or the inputs'
    # shapes (a shape is None when the models are not there to read)
    check_args: Callable | None = None
    # a matrix decomposition (SVD, eigendecomposition, Cholesky, a solve): LAPACK scales
    # poorly over threads, so the local scheduler computes units holding one side by
    # side on one thread each (runtime/scheduler.py, "Decomposing phases")
    decomposes: bool = False

    @property
    def tensor_params(self) -> list[ParamSpec]:
        return [p for p in self.params if p.type in ("tensor", "tensors")]

    @property
    def value_params(self) -> list[ParamSpec]:
        return [p for p in self.params if p.type not in ("tensor", "tensors")]


OPS: dict[str, OpDef] = {}


def _type_of(ann: Any) -> tuple[str, tuple[str, ...], bool]:
    """Map an annotation to (type name, choices, optional)."""
    optional = False
    origin = get_origin(ann)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in get_args(ann) if a is not type(None)]
        optional = len(args) != len(get_args(ann))
        ann = args[0]
        origin = get_origin(ann)
    if ann is Tensor:
        return "tensor", (), optional
    if origin is list:
        (inner,) = get_args(ann)
        return ("tensors" if inner is Tensor else "numbers"), (), optional
    if origin is Literal:
        return "string", tuple(get_args(ann)), optional
    names = {float: "number", int: "int", str: "string", bool: "bool"}
    if ann in names:
        return names[ann], (), optional
    raise TypeError(f"unsupported op annotation {ann!r}")


def op(name: str | None = None, *, kind: str = "map", public: bool = True, inplace: bool = False,
       ranges: dict[str, tuple[float | None, float | None]] | None = None,
       tile_stat: tuple[Callable, Callable] | None = None, check_shapes: Callable | None = None,
       check_values: Callable | None = None, check_args: Callable | None = None, decomposes: bool = False):
    """Register `fn` as a primitive; its signature is the op's schema."""

    def deco(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        params = []
        for p in inspect.signature(fn).parameters.values():
            if p.name.startswith("_"):
                continue  # executor-provided keywords (e.g. _inplace)
            typ, choices, optional = _type_of(hints[p.name])
            params.append(ParamSpec(p.name, typ, p.default, choices, optional, (ranges or {}).get(p.name)))
        opname = name or fn.__name__.rstrip("_")
        OPS[opname] = OpDef(opname, fn, tuple(params), kind, public, inplace,
                            inspect.getdoc(fn) or "", dict(ranges or {}), tile_stat, check_shapes,
                            check_values, check_args, decomposes)
        return fn

    return deco


class _LazyTorch:
    # NOTE: ops reference `torch.*` through this proxy so that importing the registry
    # (which `check` does, to know op signatures) does not import torch.
    def __getattr__(self, item: str) -> Any:
        import torch as _torch

        value = getattr(_torch, item)
        setattr(self, item, value)  # later lookups skip __getattr__ (ops call torch.* per tile)
        return value


torch: Any = _LazyTorch()


# Elements per sub-chunk of the streaming primitives: small enough that the temporaries
# of a pass stay in the CPU cache, big enough that per-call overhead is negligible.
SUB_CHUNK = 1 << 17
