"""DELLA's magnitude-ranked random pruning (MagPrune) and MergeKit's norm rescale.

Both are whole-tensor ops (not split into row blocks): MagPrune ranks the entries of
each row, and the rescale needs the norms of the whole tensor.
"""

from __future__ import annotations

from typing import Literal

from .registry import Tensor, op, torch


def _magprune_values(params: dict):
    density, epsilon = params.get("density", 0.5), params.get("epsilon", 0.15)
    if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        return ("epsilon", f"density {density:g} ± epsilon {epsilon:g} leaves (0, 1)",
                (f"choose epsilon with {density:g} - epsilon > 0 and {density:g} + epsilon < 1, "
                f"i.e. |epsilon| < {min(density, 1.0 - density):g} (MergeKit refuses the same values)"))
    return None


def magprune_probabilities(x, density: float, epsilon: float):
    """Keep probabilities of DELLA's MagPrune for x (float32, x's shape, rows as MergeKit
    ranks them): in each row (dim 1; a 1-D tensor is one row) the entries are ranked by
    magnitude, r = 0 for the smallest to 1 for the largest, and p = density - epsilon +
    2 epsilon r, so the mean keep probability of a row is density exactly.

    NOTE: equal magnitudes are ranked in index order (a stable sort); MergeKit's
    argsort breaks such ties arbitrarily. A row of one entry gets p = density (MergeKit's
    formula divides 0 by 0 there)."""
    t = x.unsqueeze(0) if x.dim() < 2 else x
    n = t.shape[1]
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1, stable=True), dim=1).to(torch.float32)
    if n > 1:
        probs = (density - epsilon) + (ranks / (n - 1)) * (2 * epsilon)
    else:
        probs = torch.full_like(ranks, density)
    return probs.reshape(x.shape)


# Entries per block of MagPrune's draws and ranks (whole rows of dim 0): bounds its
# temporaries (int64 ranks, float64 draws) instead of allocating them for the whole tensor.
BLOCK = 1 << 20


@op(ranges={"density": (0.0, 1.0), "epsilon": (-1.0, 1.0)}, check_values=_magprune_values)
def magprune(x: Tensor, density: float = 0.5, epsilon: float = 0.15,
             rescale: Literal["none", "inverse"] = "none", seed: int = 0) -> Tensor:
    """DELLA's MagPrune (Deep et al. 2024; MergeKit `della_magprune`): keep each entry of
    x (any shape, float) with probability p = density - epsilon + 2 epsilon r, r its
    magnitude rank in its row scaled to [0, 1] (see `magprune_probabilities`), drawn
    independently per entry; the others become 0.

    rescale="inverse" divides each kept entry by its p (the DELLA paper); "none" keeps
    the values (MergeKit rescales the tensor's L1 norm instead: `match_norm`). density
    >= 1 returns x unchanged, density <= 0 zeros (as MergeKit). E006 unless density ±
    epsilon lies in (0, 1) (for 0 < density < 1, as MergeKit).

    The draws are uniform float64 from numpy's SFC64 generator seeded per tensor (from
    `seed`, the tensor's name and the input expression), one per entry in the flat order
    of x; an entry is kept iff its draw < p. MergeKit draws `torch.bernoulli` from
    torch's global RNG: the masks differ, their distribution is the same. Computed in
    blocks of whole dim-0 slices (the same draws and ranks as on the whole tensor).
    """
    import numpy as np

    if density >= 1.0:
        return x
    if density <= 0.0:
        return torch.zeros_like(x)
    t = x.unsqueeze(0) if x.dim() < 2 else x
    out = torch.empty_like(t)
    gen = np.random.Generator(np.random.SFC64(seed))
    step = max(1, BLOCK // max(1, t[0].numel()))
    for s in range(0, t.shape[0], step):
        blk = t[s:s + step]
        probs = magprune_probabilities(blk, density, epsilon)
        draws = torch.from_numpy(gen.random(blk.numel(), dtype=np.float64)).reshape(blk.shape).to(x.device)
        keep = draws < probs.double()
        if rescale == "inverse":
            out[s:s + step] = torch.where(keep, blk / probs.to(x.dtype), torch.zeros_like(blk))
        else:
            out[s:s + step] = blk * keep.to(x.dtype)
    return out.reshape(x.shape)


@op(ranges={"eps": (0.0, None)})
def match_norm(x: Tensor, ref: Tensor, norm: Literal["l1", "l2", "linf"] = "l1", eps: float = 1e-7) -> Tensor:
    """x rescaled to the norm of ref: x * (‖ref‖ / ‖x‖), the norm over the whole tensor
    (l1: Σ|v|, l2: √Σv², linf: max|v|); x unchanged when either norm is below eps.
    MergeKit's `rescaled_masked_tensor` (the `rescale: true` of its task-arithmetic
    family uses l1, eps 1e-7) with x the sparsified and ref the original task vector.
    Norms are computed in float64 (MergeKit: in the tensor's dtype)."""
    if norm == "l1":
        before, after = float(ref.double().abs().sum()), float(x.double().abs().sum())
    elif norm == "l2":
        before, after = float(ref.double().norm()), float(x.double().norm())
    else:
        before = float(ref.abs().max()) if ref.numel() else 0.0
        after = float(x.abs().max()) if x.numel() else 0.0
    if before < eps or after < eps:
        return x
    return x * (before / after)
