"""Spherical interpolation and dtype casts."""

from __future__ import annotations

from typing import Literal

from .registry import Tensor, op, torch


@op(ranges={"t": (0.0, 1.0)})
def slerp(a: Tensor, b: Tensor, t: float = 0.5, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation of two whole tensors (MergeKit's `slerp`):
    angle from the normalized tensors; near-parallel tensors (|cos| > dot_threshold)
    fall back to linear interpolation."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a64.norm(), b64.norm()
    ua = a64 / na if na > eps else a64
    ub = b64 / nb if nb > eps else b64
    dot = min(1.0, max(-1.0, float((ua * ub).sum())))
    if abs(dot) > dot_threshold:
        return torch.lerp(a, b, t)
    import math

    theta0 = math.acos(dot)
    s0 = math.sin(theta0 - theta0 * t) / math.sin(theta0)
    s1 = math.sin(theta0 * t) / math.sin(theta0)
    return a * s0 + b * s1


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "BF16": "bfloat16",
          "F16": "float16", "F32": "float32", "F64": "float64"}


@op(public=False)
def cast(x: Tensor, dtype: Literal["bf16", "fp16", "fp32", "F64", "F32", "F16", "BF16"] = "fp32") -> Tensor:
    """Convert to the output dtype."""
    return x.to(getattr(torch, DTYPES[dtype]))
