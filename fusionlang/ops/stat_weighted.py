"""Merges weighted by model-shaped statistics from a model stage (fusionlang.stages):
Fisher merging (elementwise weights) and RegMean (Gram matrices of layer inputs)."""

from __future__ import annotations

from .registry import Tensor, op, torch


def _pairs(models: list, stats: list) -> str | None:
    return None if len(models) == len(stats) else f"{len(models)} models but {len(stats)} statistics"


def _same_shapes(shapes: list[list]) -> str | None:
    models, weights = shapes
    problem = _pairs(models, weights)
    if problem or models[0] is None or weights[0] is None:
        return problem
    if tuple(models[0]) != tuple(weights[0]):
        return f"the weights have shape {list(weights[0])} but the models {list(models[0])}"
    return None


@op(check_shapes=_same_shapes)
def fisher_weighted(models: list[Tensor], weights: list[Tensor]) -> Tensor:
    """Elementwise weighted average  Σ_i F_i ⊙ θ_i / Σ_i F_i  (Matena & Raffel 2022,
    "Merging Models with Fisher-Weighted Averaging"). `weights`: one non-negative tensor
    per model, of the model's shape (e.g. `fisher(models, data)`, which already includes
    FusionBench's minimal_fisher_weight and normalisation). float32."""
    num = torch.zeros_like(models[0], dtype=torch.float32)
    den = torch.zeros_like(num)
    for x, w in zip(models, weights):
        num.add_(w * x)
        den.add_(w)
    return num.div_(den)


def _gram_shapes(shapes: list[list]) -> str | None:
    models, grams = shapes
    problem = _pairs(models, grams)
    if problem or models[0] is None or grams[0] is None:
        return problem
    w, g = tuple(models[0]), tuple(grams[0])
    if len(w) < 2:
        return f"a Gram matrix needs a weight matrix, not a tensor of shape {list(w)}"
    d = 1
    for k in w[1:]:
        d *= k
    if len(g) == 2:
        ok = g == (d, d)
    else:
        ok = len(g) == 3 and g[1] == g[2] == d and w[0] % g[0] == 0
    return None if ok else f"Gram matrices of shape {list(g)} do not fit a weight of shape {list(w)}"


@op(check_shapes=_gram_shapes, ranges={"alpha": (0.0, 1.0)}, decomposes=True)
def regmean_solve(models: list[Tensor], grams: list[Tensor], alpha: float = 0.95) -> Tensor:
    """RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of
    Language Models"): the weight W* [out, in] minimising Σ_i ‖X_i W*ᵀ − X_i W_iᵀ‖², i.e.
    W*ᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ, with G_i = X_iᵀX_i / N_i the Gram matrix of the
    layer's inputs on model i's data and G̃_i = alpha·G_i + (1 − alpha)·diag(G_i)
    (off-diagonal entries scaled by alpha: FusionBench's reduce_non_diagonal_ratio).
    Convolutions: W [out, in/g, kh, kw] is solved per group g as a Linear over its
    unfolded patches, with G [g, d, d] (d = in/g·kh·kw). Solved in float64 with
    `torch.linalg.solve` (FusionBench multiplies by `torch.inverse`; the same solution
    for the well-conditioned sums that alpha < 1 gives). Input dimensions that are zero on
    all the data (dead channels) take the models' average weights; a sum still singular
    is solved by pseudo-inverse (the minimum-norm fit)."""
    w0 = models[0]
    groups = grams[0].shape[0] if grams[0].dim() == 3 else 1
    out = w0.shape[0]
    lhs = None
    rhs = None
    for w, g in zip(models, grams):
        g = g.double()
        if g.dim() == 2:
            g = g.unsqueeze(0)
        diag = torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))
        g = alpha * g + (1.0 - alpha) * diag
        wt = w.double().reshape(groups, out // groups, -1).transpose(1, 2)  # [g, d, out/g]
        lhs = g if lhs is None else lhs + g
        term = torch.bmm(g, wt)
        rhs = term if rhs is None else rhs + term
    # NOTE: an input dimension no row of the data ever activates (a dead channel) has a
    # zero row and column in every Gram matrix; the fit does not determine its weights,
    # so they take the models' average (the system decouples: 1·w = mean).
    dead = torch.diagonal(lhs, dim1=-2, dim2=-1) == 0
    if bool(dead.any()):
        mean = sum(w.double().reshape(groups, out // groups, -1).transpose(1, 2) for w in models) / len(models)
        lhs = lhs + torch.diag_embed(dead.double())
        rhs = torch.where(dead.unsqueeze(-1), mean, rhs)
    try:
        merged = torch.linalg.solve(lhs, rhs)  # [g, d, out/g]
    except RuntimeError:  # singular beyond dead inputs: the minimum-norm least-squares fit
        merged = torch.linalg.pinv(lhs, hermitian=True) @ rhs
    return merged.transpose(1, 2).reshape(w0.shape).to(torch.float32)


def _coefficient_shapes(shapes: list[list]) -> str | None:
    models, coefficients = shapes
    if len(coefficients) != 1:
        return f"{len(coefficients)} coefficient vectors (one is needed)"
    c = coefficients[0]
    if c is not None and tuple(c) != (len(models),):
        return f"a coefficient vector of shape {list(c)} for {len(models)} models"
    return None


@op(check_shapes=_coefficient_shapes)
def coefficient_sum(base: Tensor, models: list[Tensor], coefficients: list[Tensor]) -> Tensor:
    """base + Σ_i c_i (m_i − base): task arithmetic with per-tensor coefficients c [n]
    from a stage (AdaMerging's learned λ). float32."""
    c = coefficients[0].to(torch.float32)
    out = base.to(torch.float32).clone()
    for i, m in enumerate(models):
        out.add_(m.to(torch.float32) - base, alpha=float(c[i]))
    return out
