"""Merging LoRA adapters in adapter space (PEFT's `add_weighted_adapter`): the factors
A [r, in] and B [out, r] of each module are combined without forming a dense weight
(linear family, `cat`), or their updates are combined and factored again (SVD family).

Definitions follow PEFT 0.21 (`peft/utils/merge_utils.py`, `LoraModel.add_weighted_adapter`):
pruning by magnitude keeps the k = ⌊density·numel⌋ entries of largest magnitude; the
majority sign of TIES is that of Σ xᵢ ("total") or of Σ sign(xᵢ) ("frequency"), ≥ 0
counting as +, taken on the pruned tensors before weighting; the disjoint merge divides
by the number of agreeing entries (at least 1). DARE's random pruning uses fusionlang's
seeded masks (`sparsify.drop`) where PEFT draws from torch's global generator.
"""

from __future__ import annotations

from typing import Literal

from .registry import Tensor, op, torch

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _pruned(x, method: str, density: float, seed: int):
    if density >= 1:
        return x
    if method in ("ties", "magnitude_prune"):
        flat = x.reshape(-1)
        keep = torch.zeros_like(flat)
        k = int(density * flat.numel())
        if k > 0:
            keep[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
        return x * keep.reshape(x.shape)
    if method in ("dare_linear", "dare_ties"):
        from .sparsify import drop

        return drop(x, density, "inverse", seed)
    return x


@op(public=False)
def adapter_combine(xs: list[Tensor], weights: list[float], method: Literal[
        "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "linear", density: float = 1.0,
        majority_sign_method: Literal["total", "frequency"] = "total", seed: int = 0) -> Tensor:
    """PEFT's task-tensor merges on same-shaped tensors (LoRA A's, or B's, or updates):
    `linear` Σ wᵢxᵢ; `magnitude_prune` / `dare_linear` the same after pruning each xᵢ by
    magnitude / at random (rescaled by 1/density); `ties` / `dare_ties` the disjoint merge
    Σ wᵢxᵢ·[sign xᵢ = majority] / max(1, Σ [sign xᵢ = majority]) after pruning. float32.
    Raises ValueError for tensors of different shapes."""
    if len({tuple(x.shape) for x in xs}) != 1:
        raise ValueError(f"adapter tensors of different shapes: {[tuple(x.shape) for x in xs]}")
    ts = torch.stack([_pruned(x.float(), method, density, seed + i) for i, x in enumerate(xs)])
    w = torch.tensor(weights, dtype=torch.float32).reshape((-1,) + (1,) * (ts.dim() - 1))
    if method in ("ties", "dare_ties"):
        sign = ts.sign()
        votes = ts.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
        agree = sign == torch.where(votes >= 0, 1.0, -1.0)
        return (ts * w * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return (ts * w).sum(dim=0)


@op(public=False)
def adapter_cat(xs: list[Tensor], weights: list[float], dim: int = 0, total: int = 0) -> Tensor:
    """`cat`: the weighted factors side by side, wᵢ·xᵢ concatenated along `dim` (0: the A's
    rows, 1: the B's columns) and zero-padded to `total` along it (PEFT's new rank, the
    sum of the adapters' ranks, when an adapter does not target this module). float32."""
    cat = torch.cat([x.float() * float(wi) for x, wi in zip(xs, weights, strict=True)], dim=dim)
    if cat.shape[dim] < total:
        pad = list(cat.shape)
        pad[dim] = total - cat.shape[dim]
        cat = torch.cat([cat, torch.zeros(pad, dtype=cat.dtype, device=cat.device)], dim=dim)
    return cat


@op(public=False, decomposes=True)
def adapter_svd(xs: list[Tensor], weights: list[float], scales: list[float], method: Literal[
        "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "linear", density: float = 1.0,
        majority_sign_method: Literal["total", "frequency"] = "total", seed: int = 0, rank: int = 8,
        transpose: bool = False, clamp: float = -1.0, full_matrices: bool = True) -> Tensor:
    """The SVD family: each adapter's update Δᵢ = sᵢ·Bᵢ·Aᵢ (`xs` = [A₁, B₁, A₂, B₂, ...],
    sᵢ its lora_alpha/r; transposed for an embedding, as PEFT's get_delta_weight),
    combined by `adapter_combine(method)`, transposed back, and factored again:
    Δ = U·S·Vᴴ, A = Vᴴ[:rank] [rank, in], B = U[:, :rank]·S[:rank] [out, rank]; with
    clamp in (0, 1), both clamped to ± the `clamp` quantile of their entries together.
    `full_matrices` as PEFT's svd_full_matrices (the same LAPACK call, so the same signs
    of singular-vector pairs, which the clamp quantile depends on). Ranks beyond
    min(out, in) are zero rows / columns. Returns [A | B] packed, float32."""
    deltas = []
    for i, s in enumerate(scales):
        d = (xs[2 * i + 1].float() @ xs[2 * i].float()) * float(s)
        deltas.append(d.T if transpose else d)
    delta = adapter_combine(deltas, weights, method, density, majority_sign_method, seed)
    if transpose:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    r = min(int(rank), s.shape[0])
    b, a = u[:, :r] * s[:r], vh[:r]
    if 0 < clamp < 1:
        hi = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    if r < rank:
        a = torch.cat([a, torch.zeros(rank - r, a.shape[1])])
        b = torch.cat([b, torch.zeros(b.shape[0], rank - r)], dim=1)
    return torch.cat([a.reshape(-1), b.reshape(-1)])
