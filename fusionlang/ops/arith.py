"""Elementwise arithmetic and reductions over lists of tensors (model soups)."""

from __future__ import annotations

from .registry import Tensor, op, torch


@op(public=False)
def const(value: float = 0.0) -> Tensor:
    """A scalar constant (e.g. DARE's 1/density rescale factor)."""
    return torch.tensor(value, dtype=torch.float64)


@op(public=False, inplace=True)
def add(a: Tensor, b: Tensor, _inplace: bool = False) -> Tensor:
    """a + b"""
    return a.add_(b) if _inplace else a + b


@op(public=False, inplace=True)
def sub(a: Tensor, b: Tensor, _inplace: bool = False) -> Tensor:
    """a - b"""
    return a.sub_(b) if _inplace else a - b


@op(public=False, inplace=True)
def mul(a: Tensor, b: Tensor, _inplace: bool = False) -> Tensor:
    """a * b (elementwise)"""
    return a.mul_(b) if _inplace else a * b


@op(public=False, inplace=True)
def scale(x: Tensor, k: float = 1.0, _inplace: bool = False) -> Tensor:
    """k * x"""
    return x.mul_(k) if _inplace else x * k


@op(public=False, inplace=True)
def axpy(y: Tensor, x: Tensor, k: float = 1.0, _inplace: bool = False) -> Tensor:
    """y + k * x (fused by the fold pass from add(y, scale(x, k)))"""
    return y.add_(x, alpha=k) if _inplace else torch.add(y, x, alpha=k)


@op("sum", inplace=True)
def sum_(xs: list[Tensor], _inplace: bool = False) -> Tensor:
    """Sum of a list of models, per tensor."""
    acc = xs[0] if _inplace else xs[0].clone()
    for x in xs[1:]:
        acc.add_(x)
    return acc


@op(inplace=True)
def mean(xs: list[Tensor], _inplace: bool = False) -> Tensor:
    """Uniform average (a model soup)."""
    return sum_(xs, _inplace=_inplace).div_(len(xs))


def weights_sum_is_zero(weights: list[float]) -> bool:
    """True when `weights` sum to zero up to float rounding, so normalizing by their sum
    is undefined. Lowering reports it as E006 at the user's `weights=`; the op and the
    fold pass use the same test, so a plan never divides by a rounding residue."""
    return abs(sum(weights)) <= 1e-8 * max(1.0, max((abs(w) for w in weights), default=0.0))


@op(inplace=True)
def weighted(xs: list[Tensor], weights: list[float], normalize: bool = True, _inplace: bool = False) -> Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when normalize (MergeKit `linear`)."""
    acc = xs[0].mul_(weights[0]) if _inplace else xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        acc.add_(x, alpha=w)
    if normalize:
        if weights_sum_is_zero(weights):
            raise ValueError(f"weights {weights} sum to zero: cannot normalize")
        acc.div_(sum(weights))
    return acc


@op()
def lerp(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """(1 - t) a + t b"""
    return torch.lerp(a, b, t)
