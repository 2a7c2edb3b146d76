"""The mathematics of alignment: permutations by weight matching, transport maps by
optimal transport, and Wasserstein barycenters of N models, over the permutation spec
of `arch.permutation`.

A *map* for a permutation p of a reference model (n_a units) and another model (n_b
units) is either an index tensor `perm` (int64 [n_a]: aligned unit i is the other
model's unit perm[i]) or a float tensor M [n_a, n_b] whose rows sum to 1 (aligned unit
i is Σ_j M[i, j] · unit j: a soft alignment). `apply_maps` applies maps to every member
axis of the spec, so a hard map leaves the model's function unchanged.

References:
- Git Re-Basin (Ainsworth, Hayase, Srinivasa, ICLR 2023), Algorithm 1 "weight
  matching": coordinate descent over the permutations in random order, each solved as a
  linear assignment (`scipy.optimize.linear_sum_assignment`) maximising Σ ⟨W_a, P W_b⟩
  over every weight the permutation touches (BatchNorm's running statistics are moved,
  not matched), with the other permutations held fixed,
  until no permutation changes; as github.com/samuela/git-re-basin `weight_matching`.
- OT fusion (Singh & Jaggi, NeurIPS 2020, "Model Fusion via Optimal Transport"): per
  layer, in network order, a transport plan T between the reference's and the other
  model's neurons (uniform marginals) under a ground cost — the squared Euclidean
  distance between neurons' activations on data ("acts" mode) or between their incoming
  weights with the previous layers' maps applied ("wts" mode) — exact (`ot.emd`) or
  entropic (`ot.sinkhorn`); the aligned neurons are T^T·n_a applied to the other model.
- Wasserstein barycenter fusion (as in "Heterogeneous Federated RL using Wasserstein
  Barycenters"): per layer, the free-support barycenter (`ot.lp.free_support_barycenter`)
  of the N models' neuron clouds, initialised at the first model's, then each model
  transported onto it and the transported models averaged with the barycenter weights.
"""

from __future__ import annotations

import numpy as np
import torch

from ..arch.permutation import Member, Perm, PermSpec

Map = torch.Tensor


def unit_view(t: torch.Tensor, m: Member, size: int) -> torch.Tensor:
    """Tensor `t` as [size, rest]: row i holds every entry of unit i on axis `m.axis`."""
    x = t.movedim(m.axis, 0)
    rest = x.shape[1:]
    x = x.reshape(m.repeats, size, m.unit, *rest).movedim(1, 0)
    return x.reshape(size, -1)


def apply_map(t: torch.Tensor, m: Member, size: int, mp: Map) -> torch.Tensor:
    """`t` with map `mp` applied on member axis `m.axis` (size `size` units before; an
    index map keeps the size, a matrix [n_a, size] makes it n_a)."""
    x = t.movedim(m.axis, 0)
    rest = x.shape[1:]
    x = x.reshape(m.repeats, size, m.unit, *rest)
    if mp.dtype == torch.int64:
        y = x.index_select(1, mp)
    else:
        y = torch.einsum("ij,rj...->ri...", mp.to(x.dtype), x)
    return y.reshape(-1, *rest).movedim(0, m.axis).contiguous()


def apply_maps(spec: PermSpec, state: dict[str, torch.Tensor], maps: dict[str, Map],
               skip: tuple[str, int] | None = None) -> dict[str, torch.Tensor]:
    """A copy of `state` with each permutation's map applied to all its members;
    permutations without a map and the member (tensor, axis) `skip` are left as they are.
    Tensors no permutation touches are shared, not copied."""
    out = dict(state)
    for p in spec.perms:
        mp = maps.get(p.name)
        if mp is None:
            continue
        for m in p.members:
            if skip is not None and (m.tensor, m.axis) == skip:
                continue
            out[m.tensor] = apply_map(out[m.tensor], m, p.size, mp)
    return out


def _lsa(score: np.ndarray) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    _rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.as_tensor(cols, dtype=torch.int64)


def weight_matching(spec: PermSpec, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0) -> dict[str, Map]:
    """Git Re-Basin weight matching: one permutation (int64 [size]) per permutation of
    `spec` making `other` closest to `ref` in Σ ⟨W_ref, P W_other⟩. Both state dicts
    hold every member tensor with equal shapes (float; computed in float64). The order in
    which permutations are visited is drawn from `seed`; stops after `max_iter` sweeps or
    the first sweep that changes nothing."""
    perms = {p.name: torch.arange(p.size) for p in spec.perms}
    a64 = {k: v.double() for k, v in ref.items() if k in spec.by_tensor()}
    b64 = {k: v.double() for k, v in other.items() if k in spec.by_tensor()}
    g = torch.Generator().manual_seed(int(seed))
    touching = spec.by_tensor()
    for _ in range(int(max_iter)):
        changed = False
        for idx in torch.randperm(len(spec.perms), generator=g).tolist():
            p = spec.perms[idx]
            score = torch.zeros(p.size, p.size, dtype=torch.float64)
            for m in p.members:
                if not m.match:
                    continue
                wb = b64[m.tensor]
                for q, mq in touching[m.tensor]:
                    if q.name != p.name:
                        wb = apply_map(wb, mq, q.size, perms[q.name])
                score += unit_view(a64[m.tensor], m, p.size) @ unit_view(wb, m, p.size).T
            new = _lsa(score.numpy())
            ar = torch.arange(p.size)
            if score[ar, new].sum() > score[ar, perms[p.name]].sum() + 1e-12 * max(1.0, float(score.abs().max())):
                changed = True
            perms[p.name] = new
        if not changed:
            break
    return perms


def _plan(cost: torch.Tensor, solver: str, reg: float) -> np.ndarray:
    """The transport plan [n_a, n_b] between uniform measures under `cost` (float64)."""
    import ot

    n_a, n_b = cost.shape
    a, b = np.full(n_a, 1.0 / n_a), np.full(n_b, 1.0 / n_b)
    c = cost.double().numpy()
    if solver == "emd":
        return ot.emd(a, b, c)
    scale = float(c.max()) or 1.0  # NOTE: reg is relative to the largest cost, so it means the same for any layer
    return ot.sinkhorn(a, b, c / scale, float(reg), numItermax=10000)


def to_map(plan: np.ndarray, soft: bool) -> Map:
    """A transport plan [n_a, n_b] as a map: rows scaled to sum to 1 (soft), or the
    permutation that carries the most mass (hard: a linear assignment on the plan;
    needs n_a == n_b)."""
    if soft:
        t = torch.as_tensor(plan, dtype=torch.float64)
        return t / t.sum(1, keepdim=True).clamp_min(1e-300)
    return _lsa(plan)


def _features(spec_perm: Perm, state: dict[str, torch.Tensor], spec: PermSpec, maps: dict[str, Map]) -> torch.Tensor:
    """A permutation's units as points [size, features]: the rows of every tensor that
    produces them ("out" members), with the maps found so far applied to their other axes."""
    touching = spec.by_tensor()
    rows = []
    for m in spec_perm.members:
        if m.role != "out" or not m.match:
            continue
        w = state[m.tensor].double()
        for q, mq in touching[m.tensor]:
            if q.name != spec_perm.name and q.name in maps:
                w = apply_map(w, mq, q.size, maps[q.name])
        rows.append(unit_view(w, m, spec_perm.size))
    return torch.cat(rows, 1)


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n_x, n_y] between the rows of x [n_x, d] and y [n_y, d]."""
    x, y = x.double(), y.double()
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def transport_maps(spec: PermSpec, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                   acts_ref: dict[str, torch.Tensor] | None = None, acts_other: dict[str, torch.Tensor] | None = None,
                   solver: str = "emd", reg: float = 0.01, soft: bool = False) -> dict[str, Map]:
    """OT fusion's maps (Singh & Jaggi), one per permutation in network order. With
    activations ({perm name: [size, samples]} of both models on the same inputs) the
    ground cost is their squared distance; without, the squared distance between the
    units' incoming weights, each layer's with the previous layers' maps applied.
    `solver` "emd" (exact) or "sinkhorn" (entropic, `reg` relative to the largest cost);
    `soft`: keep the plan as a soft map, else round it to a permutation."""
    maps: dict[str, Map] = {}
    for p in spec.perms:
        if acts_ref is not None and acts_other is not None:
            cost = sqdist(acts_ref[p.name], acts_other[p.name])
        else:
            cost = sqdist(_features(p, ref, spec, {}), _features(p, other, spec, maps))
        maps[p.name] = to_map(_plan(cost, solver, reg), soft)
    return maps


def barycenter(spec: PermSpec, models: list[dict[str, torch.Tensor]], weights: list[float] | None = None,
               acts: list[dict[str, torch.Tensor]] | None = None, solver: str = "emd", reg: float = 0.01,
               soft: bool = False, max_iter: int = 100) -> tuple[dict[str, torch.Tensor], list[dict[str, Map]]]:
    """N-model fusion through a Wasserstein barycenter. Per permutation in network order:
    the free-support barycenter (`ot.lp.free_support_barycenter`, uniform masses, support
    initialised at model 0's units) of the models' unit clouds — their activations
    (`acts`, one {perm: [size, samples]} per model) or their incoming weights with the
    maps found so far applied — then each model's map onto it (`solver`, `soft` as in
    `transport_maps`). Returns (the fused state dict: Σ_k w_k · model k with its maps
    applied, float32; the maps of each model). `weights` default to uniform and are
    divided by their sum. Models must have equal shapes."""
    import ot

    n = len(models)
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64) / float(sum(weights))
    maps: list[dict[str, Map]] = [{} for _ in models]
    for p in spec.perms:
        if acts is not None:
            pts = [a[p.name].double() for a in acts]
        else:
            pts = [_features(p, m, spec, mk) for m, mk in zip(models, maps)]
        u = np.full(p.size, 1.0 / p.size)
        x = ot.lp.free_support_barycenter([q.numpy() for q in pts], [u] * n, pts[0].numpy().copy(), b=u,
                                          weights=w, numItermax=int(max_iter))
        bar = torch.as_tensor(x)
        for k in range(n):
            maps[k][p.name] = to_map(_plan(sqdist(bar, pts[k]), solver, reg), soft)
    fused: dict[str, torch.Tensor] = {}
    for k, m in enumerate(models):
        aligned = apply_maps(spec, {t: v.double() for t, v in m.items() if v.is_floating_point()}, maps[k])
        for t, v in aligned.items():
            fused[t] = fused[t] + w[k] * v if t in fused else w[k] * v
    return {t: v.float() for t, v in fused.items()}, maps
