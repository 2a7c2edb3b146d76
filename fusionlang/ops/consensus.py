"""TIES sign election and disjoint merge."""

from __future__ import annotations

from typing import Literal

from .registry import SUB_CHUNK, Tensor, op, torch


@op()
def disjoint_merge(xs: list[Tensor], merge: Literal["mean", "sum", "max"] = "mean", weights: list[float] | None = None) -> Tensor:
    """Elect a sign per entry (sign of the weighted sum, ties -> +), keep the entries
    that agree with it and combine them: mean (divided by the agreeing weights, as
    MergeKit and FusionBench), sum, or max magnitude with the elected sign."""
    # NOTE: written without stacking: with the elected sign e, an entry agrees iff
    # w*x*e > 0, and its contribution is e * clamp(w*x*e, 0). Each model costs a few
    # passes over one tensor and no (n_models x tensor) temporary. The passes run over
    # cache-sized sub-chunks with scratch buffers allocated once; comparisons write
    # 1.0/0.0 into float buffers (boolean results are several times slower on CPU).
    w = [1.0] * len(xs) if weights is None else [float(v) for v in weights]
    out = torch.empty_like(xs[0])
    flat = [x.reshape(-1) for x in xs]
    dst = out.reshape(-1)
    n = dst.numel()
    sub = min(n, SUB_CHUNK)
    elected_buf = torch.empty(sub, dtype=out.dtype, device=out.device)
    xe_buf = torch.empty(sub, dtype=out.dtype, device=out.device)
    den_buf = torch.empty(sub, dtype=out.dtype, device=out.device) if merge == "mean" else None
    pos_buf = torch.empty(sub, dtype=out.dtype, device=out.device) if merge == "mean" else None
    for s in range(0, n, SUB_CHUNK):
        e = min(n, s + SUB_CHUNK)
        m = e - s
        parts = [f[s:e] for f in flat]
        elected = elected_buf[:m]
        if weights is not None:
            torch.mul(parts[0], w[0], out=elected)
        else:
            elected.copy_(parts[0])
        for x, wi in zip(parts[1:], w[1:]):
            elected.add_(x, alpha=wi)
        elected.ge_(0).mul_(2.0).sub_(1.0)  # +1 where the weighted sum is >= 0, else -1
        acc = dst[s:e]
        acc.zero_()
        den = None
        if den_buf is not None:
            den = den_buf[:m]
            den.zero_()
        xe = xe_buf[:m]
        for x, wi in zip(parts, w):
            torch.mul(x, elected, out=xe)
            if wi != 1.0:
                xe.mul_(wi)
            if den is not None:
                den.add_(torch.gt(xe, 0, out=pos_buf[:m]), alpha=wi)
            xe.clamp_(min=0)
            if merge == "max":
                torch.maximum(acc, xe, out=acc)
            else:
                acc.add_(xe)
        if den is not None:
            if weights is None:
                den.clamp_(min=1.0)  # counts: 0 -> 1 (no agreeing entry: acc is 0 there anyway)
            else:
                den.add_(torch.eq(den, 0, out=pos_buf[:m]))  # 0 -> 1
            acc.div_(den)
        acc.mul_(elected)
    return out
