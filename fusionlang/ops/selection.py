"""Entry-wise selection among task vectors and models: SCE's variance selection and
energy-weighted consensus, RAM's overlap-aware averaging, NearSwap, Arcee Fusion's
importance mask.

Each follows MergeKit 0.1.5's definition (named in each docstring) step by step, in the
inputs' float dtype like MergeKit, so that selections at a threshold come out the same.
"""

from __future__ import annotations

from .registry import Tensor, op, torch
from .sparsify import topk_mask


@op(ranges={"density": (0.0, 1.0)})
def variance_mask(xs: list[Tensor], density: float = 1.0) -> Tensor:
    """SCE's *select* step (MergeKit `sce`, select_topk): 1.0 at the entries whose
    variance across the tensors xs (population variance, over the list) is among the top
    `int(density · nonzero)` of the `nonzero` entries with non-zero variance, 0.0
    elsewhere; all ones for density >= 1, all zeros for density <= 0. Equal variances
    at the threshold are taken in flat-index order (MergeKit's topk: unspecified).
    Shapes: tensors of one shape; the mask has that shape, the tensors' dtype."""
    if density >= 1.0:
        return torch.ones_like(xs[0])
    if density <= 0.0:
        return torch.zeros_like(xs[0])
    var = torch.var(torch.stack(list(xs), dim=0), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * density)
    if k == 0:
        return torch.zeros_like(xs[0])
    return topk_mask(var.abs(), k).to(xs[0].dtype)


@op()
def sce_fuse(xs: list[Tensor]) -> Tensor:
    """SCE's *calculate* and *erase* steps (MergeKit `sce`): each task vector τ_i gets
    the weight w_i = mean(τ_i²) / Σ_j mean(τ_j²) (equal weights 1/n when that sum is
    below 1e-6, an absolute threshold, as MergeKit); an entry's sign is elected as sign(Σ_i
    τ_i) (0 counts as +) and the result is Σ_i w_i m_i τ_i / max(Σ_i w_i m_i, 1e-6), m_i =
    1 where τ_i has the elected sign (zeros never agree). Shapes: task vectors of one
    shape; the result has that shape."""
    tvs = torch.stack(list(xs), dim=0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    agree = tvs.sign() == majority
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    weights = weights.view(-1, *([1] * (tvs.dim() - 1)))
    erased = weights * agree
    return (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def _ram_values(params: dict):
    if params.get("r", 0.0) != 0.0 and params.get("epsilon", 1e-5) <= 0.0:
        return ("epsilon", ("epsilon must be > 0 when r is not 0 (it bounds the unique-entry count "
                "RAM+ divides by)"), "pass a small positive epsilon, e.g. 1e-5 (MergeKit's default)")
    return None


@op(ranges={"epsilon": (0.0, None), "alpha": (0.0, None)}, check_values=_ram_values)
def ram_fuse(xs: list[Tensor], epsilon: float = 1e-5, r: float = 0.0, alpha: float = 0.2) -> Tensor:
    """Reinforced Agent Merging (MergeKit `ram`; with r != 0 `ramplus_tl`): an entry of
    task vector τ_i contributes when |τ_i| > epsilon; entries with one contributor keep
    its value, entries with c > 1 contributors get the mean of their values. RAM+
    (tensor-local) scales model i's unique entries by λ_i = 1 + r · clamp(ρ_i, 0,
    alpha), ρ_i = (its shared entries) / max(its unique entries, epsilon), counted in
    this tensor. Shapes: task vectors of one shape; the result has that shape."""
    n = len(xs)
    tv = torch.stack(list(xs), dim=0).view(n, -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nonzero
    if r != 0.0:
        shared = (nonzero & overlap).sum(dim=1)
        alone = (nonzero & unique).sum(dim=1)
        lam = 1 + r * (shared / alone.clamp(min=epsilon)).clamp(min=0, max=alpha)
        merged = (tvz * unique * lam.unsqueeze(-1)) + (tvz * overlap / counts.clamp(min=1))
    else:
        merged = (tvz * unique) + (tvz * overlap / counts.clamp(min=1))
    return merged.sum(dim=0).reshape_as(xs[0])


@op(ranges={"t": (0.0, None)})
def near_swap(a: Tensor, b: Tensor, t: float = 0.001) -> Tensor:
    """NearSwap (MergeKit `nearswap`, t): w = clamp(t / max(|a - b|, 1e-6), 0, 1)
    elementwise, result w · b + (1 - w) · a: entries where the models are within t of
    each other take b's value, farther ones move toward b by t / |a - b|."""
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


@op()
def fusion_mask(base: Tensor, x: Tensor) -> Tensor:
    """Arcee Fusion's mask (MergeKit `arcee_fusion`): importance = |x - base| · KL(p ‖ q)
    with p, q the softmax of x and of base along the last axis (+1e-8), KL summed per
    row; 1.0 where importance >= median + 1.5 (q₃ - q₁), 0.0 elsewhere. Quantile q of n
    values is the ⌊q (n - 1)⌋-th smallest (0-based), exactly. NOTE: MergeKit estimates
    the quantiles of tensors with over 10⁶ entries from 10⁶ entries drawn with torch's
    global RNG; here they are exact (the same below 10⁶ entries)."""
    import torch.nn.functional as F

    diff = (x - base).abs()
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    m = flat.numel() - 1

    def kth(i: int):
        return torch.kthvalue(flat, i + 1).values

    q1, median, q3 = kth(m // 4), kth(m // 2), kth(3 * m // 4)
    threshold = median + 1.5 * (q3 - q1)
    return (importance >= threshold).to(x.dtype)
