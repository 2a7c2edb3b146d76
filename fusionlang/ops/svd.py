"""Singular-value and low-rank primitives: SMILE factors, LoRA factors (extract) and LoRA updates (apply).

SMILE (Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction
From Pre-Trained Foundation Models", 2024; FusionBench `SmileMoELinear`) turns each
Linear layer's task vector Δ_i = W_i − W_0 ([out, in]) into a rank-k expert
U_k·diag(S_k)·V_kᵀ and a router from the leading right singular vectors.

Leading singular triplets come from the float64 Gram matrix where that is accurate
(`ops.gram.top_svd`: faster and more accurate than LAPACK's float32 SVD, which MergeKit
and FusionBench call), else from LAPACK's SVD.
"""

from __future__ import annotations

from .gram import top_svd
from .registry import Tensor, op, torch


def smile_sizes(out_features: int, in_features: int, k: int, gate_k: int) -> tuple[int, int]:
    """The ranks SMILE keeps for a [out, in] weight: (k, gate_k), each at most the
    matrix's rank bound min(out, in); k ≤ 0 means the whole rank (FusionBench's k < 0:
    the expert is the whole task vector)."""
    r = min(int(out_features), int(in_features))
    k = r if k <= 0 else min(int(k), r)
    return k, max(1, min(int(gate_k), r))


@op(public=False, decomposes=True)
def smile_factors(base: Tensor, finetuned: Tensor, k: int = 128, gate_k: int = 1,
                  routing_use_diff: bool = True) -> Tensor:
    """SMILE's factors of one expert's Linear weight, packed into one float32 vector
    `[u | svh | gate]`:

        Δ = finetuned − base  ([out, in]),  Δ = U·diag(S)·Vᵀ  (leading triplets, `top_svd`)
        u    = U[:, :k]                     [out, k]
        svh  = (S[:k] · V[:, :k])ᵀ          [k, in]     (the expert is x ↦ u·(svh·x))
        gate = V[:, :gate_k]ᵀ               [gate_k, in] (the router's rows for this expert)

    With `routing_use_diff=false` the gate rows come from the SVD of `finetuned` itself
    (FusionBench's option of that name). k and gate_k are capped at min(out, in)
    (`smile_sizes`). Computed in float32 whatever the inputs' dtype; singular vectors
    are defined up to a common sign per (u, v) pair, and every use of them (u·svh, the
    norm of gate·x) is invariant to it. Follows FusionBench 0.2.33 `SmileMoELinear` /
    `SmileCompressedLinear` / `SmileGate`."""
    w0, w = base.float(), finetuned.float()
    if w.dim() != 2:
        raise ValueError(f"SMILE factors a Linear weight [out, in], not a tensor of shape {tuple(w.shape)}")
    k, gate_k = smile_sizes(w.shape[0], w.shape[1], k, gate_k)
    u, s, vh = _svd_top(w - w0, max(k, gate_k), cuts=(min(k, gate_k),))
    parts = [u[:, :k], s[:k, None] * vh[:k]]
    if routing_use_diff:
        parts.append(vh[:gate_k])
    else:
        parts.append(_svd_top(w, gate_k)[2][:gate_k])
    return torch.cat([p.reshape(-1) for p in parts])


@op(public=False)
def unpack(x: Tensor, offset: int = 0, shape: list[float] | None = None) -> Tensor:
    """The `shape`-shaped piece of a packed float32 vector `x` that starts at element
    `offset` (a copy, so the packed vector can be freed). Raises ValueError when the
    piece runs past the end of `x`."""
    dims = [int(d) for d in (shape or [])]
    n = 1
    for d in dims:
        n *= d
    if offset + n > x.numel():
        raise ValueError(f"piece [{offset}, {offset + n}) runs past a packed vector of {x.numel()} elements")
    return x.reshape(-1)[offset:offset + n].reshape(dims).clone()


@op(public=False, decomposes=True)
def lora_factors(base: Tensor, finetuned: Tensor, rank: int = 128, distribute_scale: bool = True,
                 sv_epsilon: float = 0.0, transpose: bool = False) -> Tensor:
    """LoRA factors of one weight's task vector, packed into one float32 vector `[A | B]`
    (MergeKit 0.1.5 `mergekit-extract-lora`, `TaskVectorDecompositionTask`):

        Δ = finetuned − base  ([out, in]; transposed first with `transpose`, for an
            embedding [vocab, dim]),  Δ = U·diag(S)·Vᵀ  (leading triplets, `top_svd`)
        r = min(rank, min(out, in)); with sv_epsilon > 0 the singular values ≤ it are 0
        A = diag(√S_r)·V_rᵀ  [r, in],  B = U_r·diag(√S_r)  [out, r]   (distribute_scale)
        A = diag(S_r)·V_rᵀ,            B = U_r                       (otherwise)

    so that B·A is Δ's best rank-r approximation. MergeKit drops the zeroed directions
    (a smaller rank); keeping them as zero rows gives the same B·A at a fixed shape.
    Raises ValueError for a tensor that is not a matrix."""
    d = finetuned.float() - base.float()
    if d.dim() != 2:
        raise ValueError(f"LoRA factors a matrix [out, in], not a tensor of shape {tuple(d.shape)}")
    if transpose:
        d = d.T
    r = max(1, min(int(rank), min(d.shape)))
    u, s, vh = _svd_top(d, r)
    s = s[:r]
    if sv_epsilon > 0:
        s = torch.where(s > sv_epsilon, s, torch.zeros_like(s))
    if distribute_scale:
        root = s.sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    else:
        a, b = s[:, None] * vh[:r], u[:, :r]
    return torch.cat([a.reshape(-1), b.reshape(-1)])


@op(public=False)
def lora_apply(w: Tensor, a: Tensor, b: Tensor, scale: float = 1.0, transpose: bool = False) -> Tensor:
    """A LoRA module merged into its base weight (PEFT's `merge_and_unload`):
    `w + scale · (b @ a)`, or `w + scale · (b @ a)ᵀ` with `transpose` (an embedding's
    `lora_embedding_A` [r, vocab] / `_B` [dim, r] on a [vocab, dim] weight, or a
    fan-in-fan-out layer such as GPT-2's Conv1D). In float32; `scale` is PEFT's
    `lora_alpha / r` (`/ √r` with rsLoRA). Shapes: a [r, in], b [out, r], w [out, in].
    Raises ValueError when the shapes do not fit."""
    delta = b.float() @ a.float()
    if transpose:
        delta = delta.T
    if tuple(delta.shape) != tuple(w.shape):
        raise ValueError(f"LoRA update {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
    return w.float() + float(scale) * delta


def _svd_top(x: Tensor, k: int, cuts: tuple[int, ...] = ()):
    """(U, S, Vh) holding at least x's k leading singular triplets (the caller also cuts
    at `cuts`): `top_svd`'s when it is accurate, else LAPACK's whole thin SVD
    (`torch.linalg.svd`)."""
    top = top_svd(x, k, cuts)
    return top if top is not None else torch.linalg.svd(x, full_matrices=False)
