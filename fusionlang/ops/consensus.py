"""TIES sign election and disjoint merge."""

from __future__ import annotations

from typing import Literal

from .registry import Tensor, op, torch


@op()
def disjoint_merge(xs: list[Tensor], merge: Literal["mean", "sum", "max"] = "mean", weights: list[float] | None = None) -> Tensor:
    """Elect a sign per entry (sign of the weighted sum, ties -> +), keep the entries
    that agree with it and combine them: mean (divided by the agreeing weights, as
    MergeKit and FusionBench), sum, or max magnitude with the elected sign."""
    w = [1.0] * len(xs) if weights is None else list(weights)
    stacked = torch.stack([x * wi for x, wi in zip(xs, w)]) if weights is not None else torch.stack(list(xs))
    total = stacked.sum(0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = torch.sign(stacked) == elected
    if merge == "sum":
        return (stacked * agree).sum(0)
    if merge == "max":
        return (stacked.abs() * agree).amax(0) * elected
    wt = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
    divisor = (wt * agree).sum(0)
    divisor[divisor == 0] = 1.0
    return (stacked * agree).sum(0) / divisor
