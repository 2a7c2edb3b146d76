"""Singular-value and low-rank primitives: SMILE factors, LoRA factors (extract) and LoRA updates (apply).

SMILE (Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction
From Pre-Trained Foundation Models", 2024; FusionBench `SmileMoELinear`) turns each
Linear layer's task vector Δ_i = W_i − W_0 ([out, in]) into a rank-k expert
U_k·diag(S_k)·V_kᵀ and a router from the leading right singular vectors.

Leading singular triplets and polar factors (`top_svd`, `polar`) come from the float64
Gram matrix where that is accurate (faster and more accurate than LAPACK's float32 SVD,
which MergeKit and FusionBench call), else from LAPACK's SVD (see GRAM_MIN_RATIO).
"""

from __future__ import annotations

from .registry import Tensor, op, torch


def smile_sizes(out_features: int, in_features: int, k: int, gate_k: int) -> tuple[int, int]:
    """The ranks SMILE keeps for a [out, in] weight: (k, gate_k), each at most the
    matrix's rank bound min(out, in); k ≤ 0 means the whole rank (FusionBench's k < 0:
    the expert is the whole task vector)."""
    r = min(int(out_features), int(in_features))
    k = r if k <= 0 else min(int(k), r)
    return k, max(1, min(int(gate_k), r))


@op(public=False)
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
    u, s, vh = _svd_top(w - w0, max(k, gate_k))
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


@op(public=False)
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


# --- Singular triplets from the Gram matrix in float64 ------------------------------------
#
# LAPACK's float32 SVD (gesdd, what MergeKit and FusionBench call) costs ~4·m²·n + 8·m³ for
# an [m, n] matrix (m ≤ n) and is accurate to ~eps32·σ_1 / gap. The leading k triplets
# from the float64 Gram matrix G = A·Aᵀ (one m²·n product) and a partial symmetric
# eigensolver (LAPACK syevr for the top k+1 eigenpairs) are 2.7× faster for 1536 × 4096
# (k = 384) and ~5× for LoRA ranks, and more accurate than the float32 SVD: the error of a
# singular vector is ~eps64·σ_1² / (σ_k² − σ_{k+1}²), which is below float32's
# eps32·σ_1 / (σ_k − σ_{k+1}) by (eps64 / eps32)·σ_1 / (σ_k + σ_{k+1}) ≤ 1e-6 while
# σ_k ≥ 1e-3·σ_1. Outside that (a task vector of rank < k, a zero one, repeated singular
# values at the cut) the route returns None and the caller keeps LAPACK's float32 SVD:
# there the factors are not determined by the matrix, and the reference's own choice is
# the one to reproduce.
GRAM_MIN_RATIO = 1e-3   # σ_k ≥ GRAM_MIN_RATIO·σ_1, else LAPACK's SVD
GRAM_MIN_GAP = 1e-6     # σ_k² − σ_{k+1}² ≥ GRAM_MIN_GAP·σ_1², else LAPACK's SVD

_BLAS = None


def _top_eigh(g, count: int):
    """The `count` largest eigenvalues (descending) and eigenvectors ([q, count]) of the
    symmetric float64 matrix `g` [q, q]. On the CPU with SciPy: LAPACK syevr for those
    pairs only, its BLAS limited to torch's thread count in this thread; otherwise (a
    GPU, or no SciPy) torch.linalg.eigh of all of them."""
    global _BLAS
    q = g.shape[0]
    if g.device.type == "cpu" and count < q:
        try:
            import scipy.linalg
            from threadpoolctl import ThreadpoolController
        except ImportError:
            pass
        else:
            if _BLAS is None:
                _BLAS = ThreadpoolController()
            with _BLAS.limit(limits=torch.get_num_threads(), user_api="blas"):
                w, z = scipy.linalg.eigh(g.numpy(), subset_by_index=[q - count, q - 1], driver="evr",
                                         overwrite_a=True, check_finite=False)
            return torch.from_numpy(w[::-1].copy()), torch.from_numpy(z[:, ::-1].copy())
    w, z = torch.linalg.eigh(g)
    return w.flip(0)[:count], z.flip(1)[:, :count]


def top_svd(x: Tensor, k: int):
    """The k leading singular triplets of a float32 matrix `x` [m, n] from its float64
    Gram matrix (the smaller side's): `(U [m, k], S [k], Vh [k, n])`, float32, S
    descending, so that U·diag(S)·Vh is x's best rank-k approximation, as
    `torch.linalg.svd(x, full_matrices=False)` truncated to k (up to the sign of each
    (u, v) pair). Returns None when that route is not accurate (see GRAM_MIN_RATIO,
    GRAM_MIN_GAP) or `x` is not float32: the caller then uses LAPACK's SVD. k is at
    most min(m, n)."""
    if x.dtype != torch.float32 or x.dim() != 2:
        return None
    wide = x.shape[0] <= x.shape[1]
    a = (x if wide else x.T).double()
    r = a.shape[0]
    k = min(int(k), r)
    lam, z = _top_eigh(a @ a.T, min(k + 1, r))
    top = float(lam[0])
    if not top > 0 or float(lam[k - 1]) < GRAM_MIN_RATIO ** 2 * top:
        return None
    if k < r and float(lam[k - 1] - lam[k]) < GRAM_MIN_GAP * top:
        return None
    s = lam[:k].sqrt()
    u = z[:, :k]
    vh = (u.T @ a).div_(s[:, None])
    if not wide:
        u, vh = vh.T, u.T
    return u.float(), s.float(), vh.float()


POLAR_RANK_TOL = 1e-5  # σ_min < this·σ_max: numerically rank-deficient, no unique polar factor


def polar(a: Tensor):
    """The orthogonal polar factor of a float32 matrix `a` [p, q] (P·Qᵀ for
    a = P·diag(σ)·Qᵀ, the nearest matrix with orthonormal columns, or rows), float32.

    For a clearly non-square `a` (the larger side ≥ 1.5× the smaller) it is a·C^(−1/2)
    with C the float64 Gram matrix of the smaller side, when C's eigenvalues lie within
    GRAM_MIN_RATIO² of each other; otherwise (a square `a`: the Gram route is no faster
    there; an ill-conditioned one) LAPACK's SVD. Returns None when `a` is numerically
    rank-deficient (σ_min < POLAR_RANK_TOL·σ_max) or not float32: its polar factor is
    not unique, and the caller reproduces its reference's own choice."""
    if a.dtype != torch.float32 or a.dim() != 2:
        return None
    tall = a.shape[0] >= a.shape[1]
    big, small = max(a.shape), min(a.shape)
    if 2 * big >= 3 * small:
        m = (a if tall else a.T).double()
        lam, w = torch.linalg.eigh(m.T @ m)
        if float(lam[-1]) > 0 and float(lam[0]) >= GRAM_MIN_RATIO ** 2 * float(lam[-1]):
            p = m @ ((w * lam.rsqrt()) @ w.T)
            return (p if tall else p.T).float()
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    if not float(s[0]) > 0 or float(s[-1]) < POLAR_RANK_TOL * float(s[0]):
        return None
    return p @ qh


def _svd_top(x: Tensor, k: int):
    """(U, S, Vh) holding at least x's k leading singular triplets: `top_svd`'s when it is
    accurate, else LAPACK's whole thin SVD (`torch.linalg.svd`)."""
    top = top_svd(x, k)
    return top if top is not None else torch.linalg.svd(x, full_matrices=False)
