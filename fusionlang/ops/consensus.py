"""TIES sign election and disjoint merge."""

from __future__ import annotations

from typing import Literal

from .registry import Tensor, op, torch


@op()
def disjoint_merge(xs: list[Tensor], merge: Literal["mean", "sum", "max"] = "mean", weights: list[float] | None = None) -> Tensor:
    """Elect a sign per entry (sign of the weighted sum, ties -> +), keep the entries
    that agree with it and combine them: mean (divided by the agreeing weights, as
    MergeKit and FusionBench), sum, or max magnitude with the elected sign."""
    # NOTE: written without stacking: with the elected sign e, an entry agrees iff
    # w*x*e > 0, and its contribution is e * clamp(w*x*e, 0). Each model costs a few
    # passes over one tensor and no (n_models x tensor) temporary.
    w = [1.0] * len(xs) if weights is None else [float(v) for v in weights]
    total = xs[0] * w[0] if weights is not None else xs[0].clone()
    for x, wi in zip(xs[1:], w[1:]):
        total.add_(x, alpha=wi)
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    del total
    acc = torch.zeros_like(elected)
    den = torch.zeros_like(elected) if merge == "mean" else None
    for x, wi in zip(xs, w):
        xe = x * elected
        if wi != 1.0:
            xe.mul_(wi)
        if den is not None:
            den.add_((xe > 0).to(den.dtype), alpha=wi)
        xe.clamp_(min=0)
        if merge == "max":
            torch.maximum(acc, xe, out=acc)
        else:
            acc.add_(xe)
    if den is not None:
        if weights is None:
            den.clamp_(min=1.0)  # counts: 0 -> 1 (no agreeing entry: acc is 0 there anyway)
        else:
            den.masked_fill_(den == 0, 1.0)
        acc.div_(den)
    return acc.mul_(elected)
