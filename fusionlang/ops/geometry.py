"""Geometric combinations of whole tensors: NuSLERP, multi-SLERP (a barycenter on the
sphere), the Karcher mean, and Model Stock's interpolation toward the base.

Each follows MergeKit 0.1.5's definition (its method named in each docstring) step by
step, in float32 for float32 inputs like MergeKit, so that the branch decisions taken on
computed values (near-parallel vectors, convergence tests) are the same.
"""

from __future__ import annotations

from .arith import weights_sum_is_zero
from .registry import Tensor, op, torch


def _two(params: dict):
    if (params.get("_n") or 2) != 2:
        return ("xs", f"{params['_n']} models given; NuSLERP interpolates exactly two",
                "pass two models (MergeKit's nuslerp takes two non-base models)")
    return None


def _work(x):
    return x.double() if x.dtype == torch.float64 else x.float()


@op(check_values=_two)
def nslerp(xs: list[Tensor], weights: list[float] | None = None, row_wise: bool = False,
           flatten: bool = True, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two tensors (MergeKit `nuslerp`), t = w1 / (w0 + w1)
    (0.5 when |w0 + w1| < 1e-6; no weights: 0.5).

    flatten=true: one angle for the whole tensor; else one per row vector (the last
    axis), or with row_wise=true per vector along axis 0 (the columns of a matrix; a 1-D
    tensor is one vector either way). Each pair is normalized (norms clamped at 1e-7),
    cos θ clamped to [-1, 1]; when 1 - cos²θ <= eps² the pair is interpolated linearly,
    else (sin((1-t)θ) a + sin(tθ) b) / sin θ. Shapes: two tensors of one shape, result
    of that shape."""
    w = [1.0, 1.0] if weights is None else [float(v) for v in weights]
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    v0, v1 = _work(xs[0]), _work(xs[1])
    shape = v0.shape
    transposed = False
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
        transposed = True
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if transposed:
        out = out.transpose(0, -1)
    return out.reshape(shape).to(xs[0].dtype)


def _weights_sum(params: dict):
    w = params.get("weights")
    if w is not None and params.get("normalize_weights", True) and weights_sum_is_zero(w):
        return ("weights", "the weights sum to 0, so normalize_weights=true cannot divide by their sum",
                "change the weights, or pass normalize_weights=false")
    return None


@op(check_values=_weights_sum, ranges={"eps": (0.0, None)})
def sphere_barycenter(xs: list[Tensor], weights: list[float] | None = None, normalize_weights: bool = True,
                      eps: float = 1e-8) -> Tensor:
    """Weighted barycenter on the hypersphere (MergeKit `multislerp`): each tensor x_i
    (flattened) is projected to the unit sphere u_i = x_i / (‖x_i‖ + eps); their weighted
    Euclidean mean, normalized, is the tangent point m; the weighted mean of the tangent
    vectors u_i - (u_i·m) m is mapped back with the exponential map (norm + eps) and
    scaled by Σ w_i ‖x_i‖. Weights (default equal) are divided by their sum when
    normalize_weights. One tensor: returned as is. Every tensor zero (a task vector of a
    tensor no fine-tune changed): zero, where MergeKit fails. When the weighted mean of
    the u_i has norm < eps: two tensors are combined linearly (w_0 x_0 + w_1 x_1), more
    are an E006 error (antipodal inputs that cancel), as in MergeKit."""
    if len(xs) == 1:
        return xs[0]
    stacked = torch.stack([_work(x) for x in xs], dim=0)
    flat = stacked.reshape(len(xs), -1)
    if not bool(flat.any()):
        return torch.zeros_like(xs[0])
    w = torch.tensor([1.0] * len(xs) if weights is None else [float(v) for v in weights], dtype=flat.dtype,
                     device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(xs) == 2:
            return (stacked[0] * w[0] + stacked[1] * w[1]).to(xs[0].dtype)
        from ..runtime.errors import RunError

        raise RunError("multislerp: the weighted mean of the models' directions is zero (antipodal models "
                       "whose weights cancel)", "change the weights", code="E006")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tnorm = torch.norm(tangent) + eps
    out = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
    out = out * (norms.squeeze(-1) * w).sum()
    return out.view(stacked.shape[1:]).to(xs[0].dtype)


@op(ranges={"max_iter": (0, None), "tol": (0.0, None)})
def karcher_mean(xs: list[Tensor], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The Karcher (Riemannian) mean of the tensors' directions on the unit sphere, with
    equal weights, scaled by the mean of their norms (MergeKit `karcher`, max_iter,
    tol). Tensors with norm <= tol do not count for the direction (all of them: zeros).
    Start: the normalized mean of the unit vectors (the first unit vector when that is
    shorter than tol); each step moves along the mean log map Σ α_i θ_i/sin θ_i (u_i -
    cos θ_i m), skipping θ_i < tol, until its norm is below tol or max_iter steps."""
    if len(xs) == 1:
        return xs[0]
    dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(xs)] * len(xs)
    norms, units = [], []
    for x in xs:
        nrm = torch.linalg.vector_norm(x.to(dtype))
        norms.append(nrm)
        units.append(torch.zeros_like(x) if nrm.item() == 0.0 else (x / nrm).to(x.dtype))
    valid = [i for i, nrm in enumerate(norms) if nrm.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    va = [alphas[i] / total for i in valid]
    vu = [units[i] for i in valid]
    mean = torch.zeros_like(vu[0])
    for a, u in zip(va, vu):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = vu[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(va, vu):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent.to(dtype))
        if tnorm.item() < tol:
            break
        mean = (torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * nrm for a, nrm in zip(alphas, norms))
    return (scale * mean).to(xs[0].dtype)


def _two_or_more(params: dict):
    if (params.get("_n") or 2) < 2:
        return ("xs", "Model Stock needs at least two fine-tuned models (it measures the angle between them)",
                "pass two or more models besides the base")
    return None


@op(check_values=_two_or_more)
def stock_average(base: Tensor, xs: list[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024; MergeKit `model_stock`, filter_wise): with N fine-
    tuned models, cos θ the mean pairwise cosine of their task vectors x_i - base (norm
    products clamped at 1e-6, cosines clamped to [-1, 1]) and t = N cos θ / (1 + (N - 1)
    cos θ), the result is t · mean(xs) + (1 - t) · base; t = 0 (the base) where |1 + (N -
    1) cos θ| < 1e-6. One angle per tensor, or with filter_wise one per row vector (the
    last axis; a 1-D tensor is one vector). Shapes: base and xs of one shape."""
    w0 = _work(base)
    ws = [_work(x) for x in xs]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            prod = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos_theta
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    (n * cos_theta) / torch.where(singular, torch.ones_like(den), den))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape).to(base.dtype)
