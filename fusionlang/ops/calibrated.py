"""Compression with calibration data, per weight matrix: Wanda and SparseGPT pruning,
BitDelta's sign-compressed deltas.

Both read a statistic of the layer's inputs X (rows = token positions of the calibration
data) that a model stage measured layer by layer (stages/pruning.py): Wanda the mean
squared input per feature, diag(XᵀX)/N [in]; SparseGPT the Gram matrix XᵀX/N [in, in].
Both results are invariant to the statistic's scale (FusionBench's hooks divide by the
number of sequences and SparseGPT multiplies by 2; the same masks and updates).
"""

from __future__ import annotations

from typing import Literal

from .masks import _n_m_args
from .registry import Tensor, op, torch


def _prune_rows_by(x: Tensor, metric: Tensor, sparsity_ratio: float) -> Tensor:
    """Zero, in every row of x, the int(cols·sparsity_ratio) entries of smallest metric
    (ties in column order: a stable sort)."""
    idx = torch.sort(metric, dim=-1, stable=True).indices[:, :int(x.shape[1] * sparsity_ratio)]
    return x.scatter(1, idx, 0.0)


def _prune_n_m_by(x: Tensor, metric: Tensor, n: int, m: int) -> Tensor:
    """Zero, in every group of m consecutive columns of a row, the n entries of smallest
    metric (a trailing group of g < m columns loses min(n, g))."""
    out = x.clone()
    _rows, cols = x.shape
    for start in range(0, cols, m):
        part = metric[:, start:start + m]
        k = min(n, part.shape[1])
        if k:
            idx = start + torch.topk(part, k, dim=1, largest=False).indices
            out.scatter_(1, idx, 0.0)
    return out


def _stat_shapes(kind: str):
    def check(shapes: list[list]) -> str | None:
        models, stats = shapes
        if len(models) != 1 or len(stats) != 1:
            return f"one model and its statistic, not {len(models)} models and {len(stats)} statistics"
        w, s = models[0], stats[0]
        if w is None or s is None:
            return None
        if len(w) != 2:
            return f"{kind} prunes weight matrices, not a tensor of shape {list(w)}"
        want = (w[1],) if kind == "Wanda" else (w[1], w[1])
        return None if tuple(s) == want else f"a {kind} statistic of shape {list(s)} does not fit a weight of shape {list(w)}"
    return check


@op(ranges={"sparsity_ratio": (0.0, 1.0), "n": (0, None), "m": (1, None)}, check_args=_n_m_args,
    check_shapes=_stat_shapes("Wanda"))
def wanda_prune(models: list[Tensor], norms: list[Tensor], prune_type: Literal["unstructured", "semistructured"] = "unstructured",
                sparsity_ratio: float = 0.5, n: int = 2, m: int = 4) -> Tensor:
    """Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
    Models"): prune the weight W [out, in] by the score |W_ij| · ‖X_j‖₂, X_j the j-th input
    feature over the calibration rows (`norms[0]` [in]: the mean of X_j², from the
    pruning stage). "unstructured": per output row, the int(in·sparsity_ratio) entries of
    smallest score become 0 (a stable sort: ties in column order); "semistructured": in
    every group of m consecutive columns of a row, the n of smallest score (n is the
    number *pruned*: n=2, m=4 keeps half). Float32 scores; the result keeps x's dtype.

    FusionBench 0.2.33 `WandaPruningForLlama` (`WandaHookFn`, then
    `unstructured_magnitude_prune_` / `semistructured_magnitude_prune_` with that metric).
    `models` is [x], one weight matrix (a list, as the other ops that take statistics).
    Raises ValueError when `norms[0]` does not have x's column count."""
    (x,), (sq,) = models, norms
    if x.dim() != 2 or sq.shape != (x.shape[1],):
        raise ValueError(f"Wanda input norms of shape {list(sq.shape)} do not fit a weight of shape {list(x.shape)}")
    metric = x.float().abs() * torch.sqrt(sq.float()).reshape(1, -1)
    if prune_type == "unstructured":
        return _prune_rows_by(x, metric, sparsity_ratio)
    return _prune_n_m_by(x, metric, n, m)


@op(ranges={"sparsity_ratio": (0.0, 1.0), "n": (0, None), "m": (1, None), "blocksize": (1, None),
            "percdamp": (0.0, None)}, check_args=_n_m_args, check_shapes=_stat_shapes("SparseGPT"), decomposes=True)
def sparsegpt_prune(models: list[Tensor], grams: list[Tensor], prune_type: Literal["unstructured", "semistructured"] = "unstructured",
                    sparsity_ratio: float = 0.5, n: int = 2, m: int = 4, blocksize: int = 128,
                    percdamp: float = 0.01) -> Tensor:
    """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
    Accurately Pruned in One-Shot"): prune W [out, in] column block by column block
    (`blocksize` columns), choosing each block's mask by w² / [H⁻¹]_jj² and updating the
    not yet pruned columns to compensate (optimal brain surgeon with the inverse Hessian's
    Cholesky factor), H = XᵀX (`grams[0]` [in, in], from the pruning stage) plus
    percdamp · mean(diag H) on its diagonal. Input features that are zero on all the data
    (diag H = 0) get weight 0. "unstructured": in each block the entries up to the
    int(numel·sparsity_ratio)-th smallest score (ties included) are pruned;
    "semistructured": in each group of m columns, the n of smallest score. Computed in
    float32; the result keeps x's dtype.

    The algorithm of IST-DASLab/sparsegpt (f5c2500) `SparseGPT.fasterprune`, which
    FusionBench 0.2.33 `SparseGPTPruningForLlama` copies. NOTE: FusionBench passes its
    `n`, `m` to fasterprune whatever its `prune_type` says, so its default configuration
    (prune_type unstructured, n=2, m=4) prunes 2:4; here `prune_type` decides (FusionBench's
    unstructured run is its n=0). `models` is [x]. Raises ValueError when the Gram
    matrix does not fit."""
    (x,), (h,) = models, grams
    if x.dim() != 2 or h.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"a Gram matrix of shape {list(h.shape)} does not fit a weight of shape {list(x.shape)}")
    prune_n, prune_m = (n, m) if prune_type == "semistructured" else (0, 0)
    w = x.float().clone()
    h = h.float().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    diag = torch.arange(cols, device=h.device)
    h[diag, diag] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        if prune_n == 0:
            score = w1 ** 2 / d1.reshape(1, -1) ** 2
            thresh = torch.sort(score.flatten())[0][int(score.numel() * sparsity_ratio)] \
                if int(score.numel() * sparsity_ratio) < score.numel() else float("inf")
            mask1 = score <= thresh
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                score = w1[:, i:i + prune_m] ** 2 / d1[i:i + prune_m].reshape(1, -1) ** 2
                k = min(prune_n, score.shape[1])
                mask1.scatter_(1, i + torch.topk(score, k, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w.to(x.dtype)


def _bitdelta_shapes(shapes: list[list]) -> str | None:
    bases, models, stats = shapes
    if len(bases) != 1 or len(models) != 1 or len(stats) != 1:
        return "one base, one model and its BitDelta statistic"
    m, s = models[0], stats[0]
    if m is None or s is None or tuple(s) == tuple(m) or (tuple(s) == (1,) and len(m) == 2):
        return None
    return f"a BitDelta statistic of shape {list(s)} fits neither as a scale nor as the value of a tensor of shape {list(m)}"


@op(check_shapes=_bitdelta_shapes)
def bitdelta_apply(bases: list[Tensor], models: list[Tensor], stats: list[Tensor]) -> Tensor:
    """BitDelta's output tensor: for a compressed weight (`stats[0]` a scale s of shape
    [1], the model a matrix) base + s · sign(model − base), sign +1 where the delta is
    >= 0 and −1 elsewhere; otherwise `stats[0]` is the calibrated value itself (same
    shape as the model). Float32 arithmetic; the result has the model's dtype.

    Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit"; FusionBench
    0.2.33 `BinaryDiff` / `load_diff` ((2·mask − 1) · coeff added to the base weight)."""
    (base,), (model,), (s,) = bases, models, stats
    if s.shape == model.shape:
        return s.to(model.dtype)
    if s.numel() != 1 or model.dim() != 2:
        raise ValueError(f"a BitDelta statistic of shape {list(s.shape)} does not fit a tensor of shape {list(model.shape)}")
    delta = model.float() - base.float()
    return (base.float() + s.float() * torch.where(delta >= 0, 1.0, -1.0)).to(model.dtype)
