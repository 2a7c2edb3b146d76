"""Sparsification of task vectors: magnitude trim (TIES), random drop (DARE), magnitude band (breadcrumbs).

Per-tensor magnitude selection uses `kthvalue` (a selection, not a full sort). The
model-wide variant (TIES paper / FusionBench) finds the exact global k-th magnitude with
two streaming histogram passes over the float bit patterns (non-negative float32 values
order like their int32 bits): 32768 buckets on the high 16 bits, then 65536 on the low
16 bits of the one bucket that holds the threshold.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from .registry import Tensor, op, torch

_UNIT = {"density": (0.0, 1.0)}


def keep_count(numel: int, density: float) -> int:
    """How many entries a per-tensor trim keeps (MergeKit: max(1, int(density * numel)))."""
    return 0 if density <= 0 else max(1, int(density * numel))


@op(public=False)
def topk_threshold(x: Tensor, density: float = 0.2) -> Tensor:
    """What a per-tensor top-k keeps, as a small value: [threshold, cut]. Entries with
    |x| > threshold are kept, and so are entries equal to it at flat index < cut, so
    that exactly k = max(1, int(density * numel)) survive (MergeKit's count; ties at the
    threshold, common for deltas of bf16 models, are taken in flat-index order)."""
    n = x.numel()
    k = keep_count(n, density)
    if k >= n:
        return torch.tensor([-1.0, 0.0], dtype=torch.float64)
    if k <= 0:
        return torch.tensor([float("inf"), 0.0], dtype=torch.float64)
    thr, above = kth_largest_magnitude(x, k)
    need = k - above
    a = x.reshape(-1)
    cut, seen, step = 0, 0, 1 << 20
    for start in range(0, n, step):  # NOTE: chunked, so many ties never need a big index tensor
        eq = a[start:start + step].abs() == thr
        cnt = int(torch.count_nonzero(eq))
        if seen + cnt >= need:
            cut = start + int(torch.nonzero(eq).reshape(-1)[need - seen - 1]) + 1
            break
        seen += cnt
    return torch.tensor([float(thr), float(cut)], dtype=torch.float64)


@op(public=False, inplace=True)
def trim_topk(x: Tensor, info: Tensor, offset: int = 0, _inplace: bool = False) -> Tensor:
    """Apply a `topk_threshold` to x, or to a block of its rows starting at flat `offset`."""
    thr, cut = float(info[0]), int(info[1])
    a = x.abs()
    mask = a > thr
    if cut > offset:
        end = min(cut - offset, x.numel())
        flat_mask = mask.reshape(-1)
        flat_mask[:end] |= a.reshape(-1)[:end] == thr
    return x.mul_(mask) if _inplace else x * mask


_STEP = 1 << 22


def kth_largest_magnitude(x, k: int) -> tuple[float, int]:
    """The k-th largest |x| and how many entries are strictly larger, exactly.

    NOTE: no sort and no full-size temporaries: |x| as float32 bits orders like an
    int32, so one streaming histogram over the high 16 bits finds the bucket holding
    the answer and a second one over the low 16 bits of that bucket finds the value.
    Memory stays at one chunk of the tensor.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= 2 * _STEP:
        return _kth_largest_sampled(flat.abs(), k)
    hist = torch.zeros(32768, dtype=torch.int64)
    for s in range(0, n, _STEP):
        bits = flat[s:s + _STEP].abs().float().view(torch.int32)
        hist += torch.bincount((bits >> 16).reshape(-1), minlength=32768)
    at_least = hist.flip(0).cumsum(0).flip(0)  # entries in this bucket or above
    bucket = int(torch.nonzero(at_least >= k).max())
    above = int(at_least[bucket + 1]) if bucket + 1 < 32768 else 0
    rank = k - above
    low = torch.zeros(65536, dtype=torch.int64)
    for s in range(0, n, _STEP):
        bits = flat[s:s + _STEP].abs().float().view(torch.int32)
        low += torch.bincount((bits[(bits >> 16) == bucket] & 0xFFFF).reshape(-1), minlength=65536)
    low_at_least = low.flip(0).cumsum(0).flip(0)
    lo = int(torch.nonzero(low_at_least >= rank).max())
    above += int(low_at_least[lo + 1]) if lo + 1 < 65536 else 0
    value = torch.tensor([(bucket << 16) | lo], dtype=torch.int32).view(torch.float32)
    return float(value), above


def _kth_largest_sampled(a, k: int) -> tuple[float, int]:
    """Exact k-th largest of a non-negative vector: a strided sample brackets the answer,
    then a selection runs only on the entries inside the bracket (falls back to a full
    selection when the bracket misses)."""
    n = a.numel()
    if n < (1 << 16):
        value = torch.kthvalue(a, n - k + 1).values
        return float(value), int(torch.count_nonzero(a > value))
    stride = 32
    sample = a[::stride].contiguous()
    m = sample.numel()
    target = (n - k) / n * m  # the answer's position in the sorted sample
    margin = 4.0 * (m * (k / n) * (1 - k / n)) ** 0.5 + 8
    lo_i, hi_i = max(1, int(target - margin)), min(m, int(target + margin) + 1)
    lo = torch.kthvalue(sample, lo_i).values
    hi = torch.kthvalue(sample, hi_i).values
    above = int(torch.count_nonzero(a > hi))
    inside = a[(a >= lo) & (a <= hi)]
    if above < k <= above + inside.numel():
        r = k - above  # the answer is the r-th largest inside the bracket
        value = torch.kthvalue(inside, inside.numel() - r + 1).values
        return float(value), int(torch.count_nonzero(a > value))
    value = torch.kthvalue(a, n - k + 1).values
    return float(value), int(torch.count_nonzero(a > value))


def topk_mask(a, k: int):
    """Boolean mask of exactly the k largest entries of a non-negative tensor `a`.

    The threshold comes from `kthvalue` (a selection, not a sort). Entries equal to the
    threshold are kept in flat-index order until k is reached: the result is
    deterministic and keeps exactly k entries even when many magnitudes tie (common
    for deltas of bf16 models), as MergeKit's top-k does.
    """
    flat = a.reshape(-1)
    thr = torch.kthvalue(flat, flat.numel() - k + 1).values
    mask = flat > thr
    need = k - int(torch.count_nonzero(mask))
    if need > 0:
        ties = torch.nonzero(flat == thr).reshape(-1)[:need]
        mask[ties] = True
    return mask.reshape(a.shape)


@op(ranges=_UNIT, inplace=True)
def trim(x: Tensor, density: float = 0.2, scope: Literal["tensor", "model"] = "tensor",
         _inplace: bool = False) -> Tensor:
    """Keep the `density` fraction of largest-magnitude entries, zero the rest.

    scope="tensor" selects within each tensor (MergeKit); scope="model" selects over all
    tensors of the task vector at once (TIES paper, FusionBench) and compiles to a
    multi-phase plan.
    """
    k = keep_count(x.numel(), density)
    if k >= x.numel():
        return x
    if k <= 0:
        return torch.zeros_like(x)
    mask = topk_mask(x.abs(), k)
    return x.mul_(mask) if _inplace else x * mask


@op(public=False)
def trim_at(x: Tensor, threshold: Tensor) -> Tensor:
    """Zero entries with |x| below a (model-wide) threshold."""
    return x * (x.abs() >= threshold.to(x.device))


def _bits(x):
    return x.abs().float().contiguous().view(torch.int32)


@op(public=False)
def magnitude_hist_hi(x: Tensor) -> Tensor:
    """Histogram of |x| over the high 16 bits of its float32 pattern."""
    return torch.bincount((_bits(x) >> 16).reshape(-1), minlength=32768).cpu()


@op(kind="reduce", public=False)
def select_bucket(hists: list[Tensor], density: float = 0.2) -> Tensor:
    """Which high-bits bucket holds the global threshold (FusionBench: kthvalue(d - int(d*density)))."""
    h = torch.stack(list(hists)).sum(0)
    d = int(h.sum())
    kk = max(1, d - int(d * density))  # 1-based rank from the smallest
    cum = torch.cumsum(h, 0)
    b = int(torch.searchsorted(cum, torch.tensor(kk, dtype=cum.dtype)))
    before = int(cum[b - 1]) if b > 0 else 0
    return torch.tensor([b, kk - before], dtype=torch.int64)


@op(public=False)
def magnitude_hist_lo(x: Tensor, bucket: Tensor) -> Tensor:
    """Histogram over the low 16 bits of the entries that fall in the selected bucket."""
    bits = _bits(x).reshape(-1)
    b = int(bucket[0])
    sel = bits[(bits >> 16) == b]
    return torch.bincount(sel & 0xFFFF, minlength=65536).cpu()


@op(kind="reduce", public=False)
def select_threshold(hists: list[Tensor], bucket: Tensor) -> Tensor:
    """The exact k-th smallest magnitude, as a 0-d float32 tensor."""
    h = torch.stack(list(hists)).sum(0)
    b, r = int(bucket[0]), int(bucket[1])
    cum = torch.cumsum(h, 0)
    lo = int(torch.searchsorted(cum, torch.tensor(r, dtype=cum.dtype)))
    return torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32)[0]


def tensor_seed(seed: int, *parts: str) -> int:
    """A per-tensor seed independent of execution order (so plans can be partitioned)."""
    h = hashlib.sha256(("\x00".join([str(seed), *parts])).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


_MASK_CHUNK = 1 << 18


def keep_mask(offset: int, n: int, density: float, seed: int):
    """DARE's Bernoulli(density) keep-mask for flat positions [offset, offset + n).

    NOTE: drawn in fixed chunks of the flattened tensor, each from its own generator
    seeded by (seed, chunk), on the CPU: the mask of a row block equals that slice of the
    whole tensor's mask, so results are bit-identical however the plan is split, run
    or ordered, and on any device.
    """
    first, last = offset // _MASK_CHUNK, (offset + n - 1) // _MASK_CHUNK
    parts = []
    for j in range(first, last + 1):
        g = torch.Generator().manual_seed(tensor_seed(seed, str(j)))
        parts.append(torch.rand(_MASK_CHUNK, generator=g) < density)
    start = offset - first * _MASK_CHUNK
    return torch.cat(parts)[start:start + n] if len(parts) > 1 else parts[0][start:start + n]


@op(ranges=_UNIT)
def drop(x: Tensor, density: float = 0.5, rescale: Literal["inverse", "l1", "none"] = "inverse", seed: int = 0) -> Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli), then rescale.

    rescale="inverse" divides by density (DARE paper, FusionBench); "l1" restores the
    tensor's L1 norm (MergeKit's rescale_norm); "none" keeps the dropped values as is.
    Compiles to row-wise `drop_rows` (plus a per-tensor `drop_l1_factor` for "l1").
    """
    if density >= 1.0:
        return x
    if rescale == "l1":
        return drop_rows(x, drop_l1_factor(x, density, seed), density, seed)
    factor = 1.0 / density if rescale == "inverse" and density > 0 else 1.0
    return drop_rows(x, torch.tensor(factor, dtype=torch.float64), density, seed)


@op(public=False)
def drop_l1_factor(x: Tensor, density: float = 0.5, seed: int = 0) -> Tensor:
    """sum|x| / sum|x * mask|: the factor that restores the L1 norm after the drop."""
    flat = x.reshape(-1)
    before = after = 0.0
    for s in range(0, flat.numel(), 1 << 22):
        chunk = flat[s:s + (1 << 22)].abs()
        before += float(chunk.sum(dtype=torch.float64))
        after += float((chunk * keep_mask(s, chunk.numel(), density, seed)).sum(dtype=torch.float64))
    return torch.tensor(before / after if after > 0 else 1.0, dtype=torch.float64)


@op(public=False, inplace=True)
def drop_rows(x: Tensor, factor: Tensor, density: float = 0.5, seed: int = 0, offset: int = 0,
              _inplace: bool = False) -> Tensor:
    """x * mask * factor for x, or for a block of its rows starting at flat `offset`."""
    if density >= 1.0:
        return x
    mask = keep_mask(offset, x.numel(), density, seed).reshape(x.shape).to(x.device)
    out = x.mul_(mask) if _inplace else x * mask
    f = float(factor)
    return out.mul_(f) if f != 1.0 else out


@op(ranges={"density": (0.0, 1.0), "gamma": (0.0, 1.0)})
def band(x: Tensor, density: float = 0.9, gamma: float = 0.01) -> Tensor:
    """Model Breadcrumbs' mask: drop the `gamma` largest-magnitude outliers and keep the next
    `density` fraction; the smallest entries are zeroed (MergeKit's `magnitude_outliers`)."""
    if density >= 1.0:
        return x
    n = x.numel()
    keep, top = int(density * n), int(gamma * n)
    # NOTE: as MergeKit: exactly `keep` entries survive; when keep + top > n the
    # outlier cut shrinks rather than the density.
    bottom = max(0, n - keep - top)
    order = torch.argsort(x.abs().reshape(-1))
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    mask[order[bottom: bottom + keep]] = True
    return x * mask.reshape(x.shape)
