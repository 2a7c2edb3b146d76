"""Subspace merging of task vectors by SVD: TSV-Merge, Iso-C, Iso-CTS.

Each primitive takes the task vectors τ_1..τ_T of one tensor name (so memory stays
bounded by one tensor group) and returns the merged task vector for that tensor. As in
FusionBench 0.2.33, only 2-D tensors (every weight matrix, embeddings and heads included)
are merged in a subspace; any other tensor (biases, norms) gets the plain mean of its
task vectors. FusionBench's `exclude_keys` are per-tensor rules in a spec.

SVDs run in the inputs' dtype when it is float32 or float64, else in float32 (as
FusionBench). Singular vectors are defined up to sign (and rotation within repeated
singular values); every result below is invariant to that choice.
"""

from __future__ import annotations

from .gram import polar, top_svd
from .registry import Tensor, op, torch


def _mean(xs: list) -> object:
    acc = xs[0].clone()
    for x in xs[1:]:
        acc.add_(x)
    return acc.div_(len(xs))


def _work(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _polar(a):
    """The orthogonal polar factor P·Qᵀ of a = P·diag(σ)·Qᵀ (the nearest matrix with
    orthonormal columns, or rows, to `a`)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _check_lists(xs: list, weights: list[float] | None) -> None:
    if not xs:
        raise ValueError("no task vectors to merge")
    if weights is not None and len(weights) != len(xs):
        raise ValueError(f"{len(weights)} weights for {len(xs)} models")


def _tsv_args(shapes: list, params: dict):
    """Compile-time check: `task` names one of the models (or is -1: the merged vector)."""
    task = params.get("task", -1)
    if not -1 <= task < len(shapes):
        return ("task", f"task={task} is not one of the {len(shapes)} models",
                f"pass 0..{len(shapes) - 1} for one task's model, or leave it out for the merged model")
    return None


@op(check_args=_tsv_args, decomposes=True)
def tsv_merge(xs: list[Tensor], alpha: float = 1.0, weights: list[float] | None = None, task: int = -1) -> Tensor:
    """Task Singular Vector merging (TSV-M) of the task vectors `xs` ([out, in] each).

    With `weights`, τ_i ← w_i·τ_i first. For a 2-D tensor with r = min(out, in) and
    k = int(r / T) (T = number of task vectors): τ_i = U_i·diag(S_i)·V_iᵀ, keep each
    task's top k triplets, concatenate U = [U_1,k … U_T,k] ([out, T·k]), S, Vᵀ
    ([T·k, in]), replace U and Vᵀ by their orthogonal polar factors (whitening: removes
    the interference between tasks' subspaces) and return alpha·U⊥·diag(S)·V⊥ᵀ. Other
    tensors: alpha·mean(τ_i). k = 0 (r < T) gives zeros, as FusionBench.
    With `task` = t ≥ 0: task t's own block U⊥[:, t·k:(t+1)·k]·diag(S_t,k)·V⊥ᵀ[t·k:(t+1)·k]
    (other tensors: the mean), not scaled by alpha: FusionBench's
    `return_single_task_models`.

    Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR 2025. Equals FusionBench 0.2.33 `TaskSingularVectorMerging`
    (`compute_and_sum_svd_mem_reduction`): a number `alpha` scales the merged vector, a
    list `alpha` is `weights`. Raises ValueError on an empty list or a weights length
    that differs from the models'."""
    _check_lists(xs, weights)
    if weights is not None:
        xs = [x * float(w) for x, w in zip(xs, weights)]
    scale = alpha if task < 0 else 1.0
    if xs[0].dim() != 2:
        return _mean(xs).mul_(scale)
    dtype = xs[0].dtype
    t = len(xs)
    r = min(xs[0].shape)
    k = int(r * (1 / t))  # NOTE: FusionBench's int(r * sv_reduction), sv_reduction = 1 / T
    if k == 0:
        return torch.zeros_like(xs[0])
    fast = _tsv_gram(xs, k, task)
    if fast is not None:
        return (fast if task >= 0 else fast.mul_(alpha)).to(dtype)
    # NOTE: the blocks go into zero-padded [out, r] / [r, in] matrices as FusionBench
    # places them: when the blocks are linearly dependent (two equal task vectors) the
    # polar factor is not unique, and the same matrix gives LAPACK's same choice.
    w0 = _work(xs[0])
    u_all = torch.zeros(w0.shape[0], r, dtype=w0.dtype, device=w0.device)
    vh_all = torch.zeros(r, w0.shape[1], dtype=w0.dtype, device=w0.device)
    s_all = torch.zeros(r, dtype=w0.dtype, device=w0.device)
    for i, x in enumerate(xs):
        u, s, vh = torch.linalg.svd(_work(x), full_matrices=False)
        u_all[:, i * k:(i + 1) * k] = u[:, :k]
        s_all[i * k:(i + 1) * k] = s[:k]
        vh_all[i * k:(i + 1) * k] = vh[:k]
    u_o = _polar(u_all)
    vh_o = _polar(vh_all)
    if task >= 0:
        block = slice(task * k, (task + 1) * k)
        return ((u_o[:, block] * s_all[block]) @ vh_o[block]).to(dtype)
    out = (u_o * s_all) @ vh_o
    return out.mul_(alpha).to(dtype)


def _whiten(us: list, vhs: list):
    """(U⊥, V⊥ᵀ): the orthogonal polar factors of the concatenated left singular vectors
    [U_1 … U_n] and right ones [V_1ᵀ; …; V_nᵀ] (`ops.gram.polar`); None when either has no
    unique polar factor (dependent blocks: the caller then builds FusionBench's matrices)."""
    u_o = polar(torch.cat(us, dim=1))
    vh_o = polar(torch.cat(vhs, dim=0)) if u_o is not None else None
    return None if vh_o is None else (u_o[0], vh_o[0])


def _tsv_gram(xs: list, k: int, task: int):
    """TSV-M's merged (or task `task`'s) vector by the float64 Gram route (`ops.gram.top_svd`,
    `polar`): each task's k leading triplets, the polar factors of the T·k used
    columns of U and rows of Vᵀ (the zero padding FusionBench adds for r mod T does not
    change them when the blocks are independent, and meets zero singular values). None
    when any step is outside that route's accuracy (then LAPACK's SVD, as FusionBench)."""
    tops = []
    for x in xs:
        top = top_svd(_work(x), k)
        if top is None:
            return None
        tops.append(top)
    white = _whiten([t[0] for t in tops], [t[2] for t in tops])
    if white is None:
        return None
    u_o, vh_o = white
    s_all = torch.cat([t[1] for t in tops])
    if task >= 0:
        block = slice(task * k, (task + 1) * k)
        return (u_o[:, block] * s_all[block]) @ vh_o[block]
    return (u_o * s_all) @ vh_o


@op(decomposes=True)
def iso_c(xs: list[Tensor]) -> Tensor:
    """Isotropic merging in the common subspace (Iso-C) of the task vectors `xs`.

    For a 2-D tensor: Σ_i τ_i = U·diag(S)·Vᵀ, returned with a flat spectrum
    U·(mean(S)·I)·Vᵀ (mean over all min(out, in) singular values). Other tensors:
    mean(τ_i). The merged model is base + scaling_factor · this.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025. Equals FusionBench 0.2.33
    `IsotropicMergingInCommonSubspace` (`iso_c`). Raises ValueError on an empty list."""
    _check_lists(xs, None)
    if xs[0].dim() != 2:
        return _mean(xs)
    dtype = xs[0].dtype
    total = _work(xs[0]).clone()
    for x in xs[1:]:
        total.add_(_work(x))
    fast = polar(total)  # U·Vᵀ and S by the float64 Gram route where accurate (ops.gram)
    if fast is not None:
        return fast[0].mul_(fast[1].mean()).to(dtype)
    # NOTE: a rank-deficient sum (e.g. opposite task vectors) has no unique U·Vᵀ:
    # LAPACK's SVD of the same matrix gives FusionBench's choice
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return ((u * s.mean()) @ vh).to(dtype)


def iso_cts_sizes(out_features: int, in_features: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common, per_task): how many directions Iso-CTS keeps from the common subspace and
    from each task's own, for a [out, in] weight: common = r − round((r − int(r·f)) / T)·T
    with r = min(out, in), per_task = (r − common) / T (FusionBench's rounding, so that
    the task-specific space divides evenly). Raises ValueError when the rounding leaves
    no room for the common space (common < 0: FusionBench fails there too)."""
    r = min(int(out_features), int(in_features))
    common = int(r * common_space_fraction)
    task_total = round((r - common) / n_tasks) * n_tasks
    common = r - task_total
    if common < 0:
        raise ValueError(f"common_space_fraction={common_space_fraction} leaves {common} common directions for a "
                         f"[{out_features}, {in_features}] weight and {n_tasks} models")
    return common, task_total // n_tasks


def _iso_cts_args(shapes: list, params: dict):
    """Compile-time check: the common space of every 2-D input's shape is not negative."""
    shape = shapes[0] if shapes else None
    if shape is None or len(shape) != 2:
        return None
    try:
        iso_cts_sizes(shape[0], shape[1], len(shapes), params.get("common_space_fraction", 0.8))
    except ValueError as err:
        hint = ("FusionBench's rounding makes the task-specific space a multiple of the number of models; "
                "a larger common_space_fraction always works")
        return ("common_space_fraction", str(err), hint)
    return None


@op(ranges={"common_space_fraction": (0.0, 1.0)}, check_args=_iso_cts_args, decomposes=True)
def iso_cts(xs: list[Tensor], common_space_fraction: float = 0.8) -> Tensor:
    """Isotropic merging in common and task-specific subspaces (Iso-CTS) of `xs`.

    For a 2-D tensor, with (c, n) = `iso_cts_sizes`: the top c singular triplets of
    Σ_i τ_i (U_c, S_c, V_c) are the common subspace; each task's projection out of it,
    τ_i − U_c·U_cᵀ·τ_i, contributes its top n triplets. The c + T·n = r left vectors
    and right vectors are each replaced by their orthogonal polar factor, the spectrum
    by its mean: mean(S)·U⊥·V⊥ᵀ. Other tensors: mean(τ_i). The merged model is base +
    scaling_factor · this.

    Marczak et al., ICML 2025 (see `iso_c`). Equals FusionBench 0.2.33
    `IsotropicMergingInCommonAndTaskSubspace` (`iso_cts`, `common_space_fraction`).
    Raises ValueError on an empty list or a fraction too small for the shape
    (`iso_cts_sizes`)."""
    _check_lists(xs, None)
    if xs[0].dim() != 2:
        return _mean(xs)
    dtype = xs[0].dtype
    common, per_task = iso_cts_sizes(xs[0].shape[0], xs[0].shape[1], len(xs), common_space_fraction)
    total = _work(xs[0]).clone()
    for x in xs[1:]:
        total.add_(_work(x))
    fast = _iso_cts_gram(xs, total, common, per_task)
    if fast is not None:
        return fast.to(dtype)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    u_c = u[:, :common]
    us, ss, vhs = [], [], []
    # NOTE: FusionBench projects with the [out, out] matrix (U_c·U_cᵀ)·w; the same
    # products give LAPACK the same matrices, which decides the (non-unique) polar factor
    # when task vectors coincide. For a tall weight (an embedding, out > 4·in) that matrix
    # would dwarf the tensor: U_c·(U_cᵀ·w) is used instead (equal up to rounding).
    proj = u_c @ u_c.T if total.shape[0] <= 4 * total.shape[1] else None
    for x in xs:
        w = _work(x)
        ut, st, vht = torch.linalg.svd(w - (proj @ w if proj is not None else u_c @ (u_c.T @ w)),
                                       full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    us.append(u_c)
    ss.append(s[:common])
    vhs.append(vh[:common])
    u_o = _polar(torch.cat(us, dim=1))
    vh_o = _polar(torch.cat(vhs, dim=0))
    return (u_o @ vh_o).mul_(torch.cat(ss).mean()).to(dtype)


def _iso_cts_gram(xs: list, total, common: int, per_task: int):
    """Iso-CTS by the float64 Gram route (`ops.gram.top_svd`, `polar`), the same value as
    `iso_cts`'s LAPACK one: U_c from the `common` leading triplets of `total`, each
    task's `per_task` leading triplets of τ_i − U_c·(U_cᵀ·τ_i). None when any step is
    outside that route's accuracy (then LAPACK's SVD, as FusionBench)."""
    if common > 0:
        top = top_svd(total, common)
        if top is None:
            return None
        u_c, s_c, vh_c = top
    else:
        u_c = total.new_zeros(total.shape[0], 0)
    us, ss, vhs = [], [], []
    if per_task > 0:
        for x in xs:
            w = _work(x)
            top = top_svd(w - u_c @ (u_c.T @ w), per_task)
            if top is None:
                return None
            us.append(top[0])
            ss.append(top[1])
            vhs.append(top[2])
    if common > 0:
        us.append(u_c)
        ss.append(s_c)
        vhs.append(vh_c)
    white = _whiten(us, vhs)
    if white is None:
        return None
    return (white[0] @ white[1]).mul_(torch.cat(ss).mean())


def _opcm_clean(merged, x, alpha: float):
    """x with the directions of `merged` removed, as OPCM's `merge_linear_weights`: in the
    full SVD basis of merged (U ΣVᵀ, full_matrices), P = Uᵀ·x·V loses its diagonal and its
    top-left split×split block (split = the first index where the cumulative share of
    the singular values exceeds alpha); U·P·Vᵀ.

    NOTE: computed with the thin SVD (r = min(m, n) columns): the entries zeroed all lie
    in P's top-left r×r corner, so U·P·Vᵀ = x − U_r·Z·V_rᵀ with Z the zeroed entries of
    U_rᵀ·x·V_r. The same value without the m×m (or n×n) basis, which for a 33000-row
    head took 4 GB and minutes."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    split = int((s.cumsum(dim=0) / s.sum() > alpha).float().argmax())
    p = u.T @ x @ vh.T
    zeroed = torch.zeros_like(p)
    zeroed[:split, :split] = p[:split, :split]
    zeroed.diagonal().copy_(p.diagonal())
    return x - u @ zeroed @ vh


@op(ranges={"alpha": (0.0, 1.0)}, decomposes=True)
def opcm_fold(xs: list[Tensor], alpha: float = 0.5, _project: bool = True) -> Tensor:
    """OPCM's un-normalized merged task vector of the task vectors `xs`, in their order:
    S_1 = τ_1, S_t = S_{t−1} + clean(S_{t−1}, τ_t), where `clean` (`_opcm_clean`)
    projects τ_t off S_{t−1}'s leading singular directions for a Linear weight
    (`_project`, set by lowering: a 2-D tensor outside the embeddings) and is τ_t
    itself for any other tensor. OPCM's λ-weighted sums equal these S_t (λ_{t−1}·M_{t−1}
    = S_{t−1}, and rescaling does not move singular vectors); the model-wide rescale to
    the mean task-vector norm is `opcm_rescale`.

    Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to
    Scalable Continual Model Merging" (OPCM), 2025; FusionBench 0.2.33 `OPCM`
    (opcm_general, `alpha`; its shuffle_order=false: the given order). Computed in
    float32 (float64 inputs: float64)."""
    _check_lists(xs, None)
    dtype = xs[0].dtype
    acc = _work(xs[0]).clone()
    for x in xs[1:]:
        w = _work(x)
        acc = acc + (_opcm_clean(acc, w, alpha) if _project and acc.dim() == 2 else w)
    return acc.to(dtype)


@op()
def opcm_rescale(x: Tensor, norms_sq: list[Tensor], total_sq: Tensor) -> Tensor:
    """x · mean_i(√norms_sq_i) / √total_sq: OPCM's rescale of the merged task vector to
    the mean of the task vectors' (model-wide) norms. Scalars in float64; raises
    ValueError when total_sq is zero."""
    total = float(total_sq) ** 0.5
    if total == 0.0:
        raise ValueError("OPCM: the merged task vector is zero")
    mean = sum(float(n) ** 0.5 for n in norms_sq) / len(norms_sq)
    return x * (mean / total)
