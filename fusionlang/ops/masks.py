"""Elementwise selection and masks over task vectors: MagMax, TALL masks, consensus,
and FusionBench's per-row and n:m magnitude pruning. All per tensor; masks are float
tensors of 1.0 / 0.0 in the inputs' shape."""

from __future__ import annotations

from typing import Literal

from .registry import Tensor, op, torch


@op()
def max_magnitude(xs: list[Tensor]) -> Tensor:
    """Per entry, the value of largest magnitude across `xs` (same shapes). Ties go to the
    later tensor (`|x_t| >= |best|` replaces the running choice).

    MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual
    Learning", ECCV 2024): FusionBench 0.2.33 `MagMaxAlgorithm` / `_magmax_select`."""
    if not xs:
        raise ValueError("no tensors to select from")
    best = xs[0].clone()
    for x in xs[1:]:
        best = torch.where(x.abs() >= best.abs(), x, best)
    return best


@op(ranges={"tall_mask_lambda": (0.0, None)})
def tall_mask(base: Tensor, finetuned: Tensor, merged: Tensor, tall_mask_lambda: float = 0.6) -> Tensor:
    """The TALL mask of one task: 1.0 where |θ0 − θt| > λ·|θ0 + τ_MTL − θt|, else 0.0
    (θ0 = `base`, θt = `finetuned`, τ_MTL = `merged`, the multi-task vector; all the
    same shape). The entries where the task's own weights are closer to the merged
    model than to the base, by a factor λ.

    Wang et al., "Localizing Task Information for Improved Model Merging and
    Compression", ICML 2024, eq. (3); the comparison (strict >) and arithmetic as in its
    code (nik-dim/tall_masks `generate_task_masks`). FusionBench 0.2.33's
    `TallMaskTaskArithmeticAlgorithm` has the same parameter but compares |θ0 − τt|
    instead of |θ0 − θt| and crashes before that (see docs/language.md)."""
    diff_pt_ft = (base - finetuned).abs()
    diff_multi_ft = (base + merged - finetuned).abs()
    return (diff_pt_ft > diff_multi_ft * tall_mask_lambda).to(base.dtype)


@op(ranges={"k": (0, None)})
def consensus_mask(masks: list[Tensor], k: int = 2) -> Tensor:
    """1.0 where at least `k` of the `masks` (1.0 / 0.0 tensors) are set, else 0.0.

    Consensus merging (Wang et al., ICML 2024, eq. (5)): the weights that at least k
    tasks' TALL masks keep (nik-dim/tall_masks `construct_consensus_mask`,
    `prun_thre_k`; k = 2 drops the "selfish" and "catastrophic" weights)."""
    if not masks:
        raise ValueError("no masks to count")
    count = masks[0].clone()
    for m in masks[1:]:
        count.add_(m)
    return (count >= k).to(masks[0].dtype)


@op(ranges={"sparsity_ratio": (0.0, 1.0)})
def prune_rows(x: Tensor, sparsity_ratio: float = 0.5, prune_type: Literal["minor", "major"] = "minor",
               others: Literal["keep", "zero"] = "keep") -> Tensor:
    """Per-row magnitude pruning of a matrix [rows, cols]: in every row zero the
    int(cols · sparsity_ratio) entries of smallest |x| (prune_type "minor"; "major":
    largest), ties in column order (a stable sort). A tensor that is not 2-D is
    returned unchanged (others="keep") or as zeros ("zero", for pruning a task vector
    whose non-matrix tensors stay at the base).

    FusionBench 0.2.33 `unstructured_magnitude_prune_` (metric |W|, or −|W| for
    `MagnitudeDiffPruningAlgorithm`'s prune_type="major"), which `MagnitudePruningForLlama`
    (prune_type "unstructured", `sparsity_ratio`) and `MagnitudeDiffPruningAlgorithm`
    (`prune_ratio`) apply to Linear weights."""
    if x.dim() != 2:
        return x.clone() if others == "keep" else torch.zeros_like(x)
    n_prune = int(x.shape[1] * sparsity_ratio)
    metric = x.abs() if prune_type == "minor" else -x.abs()
    idx = torch.sort(metric, dim=-1, stable=True).indices[:, :n_prune]
    return x.scatter(1, idx, 0.0)


def _n_m_args(shapes: list, params: dict):
    """Compile-time check: n:m pruning removes at most m of every m entries."""
    if params.get("prune_type", "semistructured") == "semistructured" and params.get("n", 2) > params.get("m", 4):
        return ("n", f"n={params.get('n', 2)} entries cannot be pruned from groups of m={params.get('m', 4)} entries",
                "n is how many of every m consecutive entries are pruned: choose n <= m")
    return None


@op(ranges={"sparsity_ratio": (0.0, 1.0), "n": (0, None), "m": (1, None)}, check_args=_n_m_args)
def magnitude_prune(x: Tensor, prune_type: Literal["unstructured", "semistructured"] = "unstructured",
                    sparsity_ratio: float = 0.5, n: int = 2, m: int = 4) -> Tensor:
    """Magnitude pruning of a weight matrix as FusionBench 0.2.33 `MagnitudePruningForLlama`
    (`prune_type`, `sparsity_ratio`, `n`, `m`): "unstructured" is `prune_rows(x,
    sparsity_ratio)`, "semistructured" is `prune_n_m(x, n, m)`. Tensors that are not 2-D
    are returned unchanged."""
    if prune_type == "unstructured":
        return prune_rows(x, sparsity_ratio=sparsity_ratio)
    return prune_n_m(x, n=n, m=m)


@op(ranges={"n": (0, None), "m": (1, None)}, check_args=_n_m_args)
def prune_n_m(x: Tensor, n: int = 2, m: int = 4, others: Literal["keep", "zero"] = "keep") -> Tensor:
    """Semi-structured n:m magnitude pruning of a matrix [rows, cols]: in every group of
    m consecutive columns of a row zero the n entries of smallest |x| (ties in column
    order). A trailing group of g < m columns loses min(n, g). A tensor that is not 2-D
    is returned unchanged (others="keep") or as zeros ("zero").

    FusionBench 0.2.33 `semistructured_magnitude_prune_` (`MagnitudePruningForLlama`,
    prune_type "semistructured", `n`, `m`: n is the number *pruned* per group, so its
    default n=2, m=4 keeps half). FusionBench raises for a trailing group of fewer than
    n columns."""
    if x.dim() != 2:
        return x.clone() if others == "keep" else torch.zeros_like(x)
    if n > m:
        raise ValueError(f"n={n} entries cannot be pruned from groups of m={m}")
    rows, cols = x.shape
    out = x.clone()
    full = cols // m * m
    if full and n:
        g = out[:, :full].reshape(rows, cols // m, m)
        idx = torch.sort(g.abs(), dim=-1, stable=True).indices[..., :n]
        out[:, :full] = g.scatter(2, idx, 0.0).reshape(rows, full)
    if full < cols and n:
        tail = out[:, full:]
        idx = torch.sort(tail.abs(), dim=-1, stable=True).indices[:, :min(n, cols - full)]
        out[:, full:] = tail.scatter(1, idx, 0.0)
    return out


@op()
def emr_unified(xs: list[Tensor]) -> Tensor:
    """EMR-merging's unified task vector of the task vectors `xs`: the elected sign
    γ = sign(Σ_t τ_t) (zero counts as −1), times the largest |τ_t| among the entries that
    agree with it: γ ⊙ max_t |τ_t ⊙ 1[τ_t·γ > 0]|.

    Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS
    2024; FusionBench 0.2.33 `emr_merge` (`EMRMerging`)."""
    total = xs[0].clone()
    for x in xs[1:]:
        total.add_(x)
    flag = (total > 0).to(xs[0].dtype).mul_(2).sub_(1)
    best = torch.zeros_like(xs[0])
    for x in xs:
        best = torch.maximum(best, (x * ((x * flag) > 0)).abs())
    return best.mul_(flag)


@op()
def emr_select(x: Tensor, unified: Tensor) -> Tensor:
    """One task's masked unified vector: unified ⊙ 1[x·unified > 0] (x the task's task
    vector; equal to FusionBench's mask 1[x·γ > 0] applied to the unified vector, which
    is zero wherever its sign γ is undefined)."""
    return unified * ((x * unified) > 0)


@op()
def mean_abs(x: Tensor) -> Tensor:
    """mean(|x|) of one tensor, a float64 scalar (EMR's per-tensor magnitude)."""
    return x.abs().mean(dtype=torch.float64)


@op()
def sum_sq(x: Tensor) -> Tensor:
    """Σ x² of one tensor, a float64 scalar (a squared norm; `model_sum` of it is the
    squared norm of a whole task vector)."""
    return x.double().square().sum()


@op()
def model_sum(x: Tensor) -> Tensor:
    """The sum of the per-tensor scalar `x` over every tensor the merge computes: a
    model-wide statistic (the plan gets a phase boundary; memory stays one tensor group).
    Lowering turns it into `sum_scalars`; this body only runs on one tensor."""
    return x.to(torch.float64).sum()


@op(kind="reduce", public=False)
def sum_scalars(xs: list[Tensor]) -> Tensor:
    """Sum of per-tensor scalars (the reduce behind `model_sum`), in float64."""
    return torch.stack([x.to(torch.float64).reshape(()) for x in xs]).sum()


@op()
def emr_rescale(x: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """x · (num / den) with two scalars (EMR's per-task rescaler Σ mean|τ_t| /
    Σ mean|unified ⊙ mask_t|). Raises ValueError when den is zero (a task whose
    entries never agree with the elected sign)."""
    if float(den) == 0.0:
        raise ValueError("EMR rescaler: the masked unified vector is zero everywhere")
    return x * float(num / den)
