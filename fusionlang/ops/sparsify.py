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

from .registry import SUB_CHUNK, Tensor, op, torch

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
    thr, _above, cut = _kth_largest(x.reshape(-1), k, want_cut=True)
    return torch.tensor([float(thr), float(cut)], dtype=torch.float64)


@op(public=False, inplace=True)
def trim_topk(x: Tensor, info: Tensor, offset: int = 0, _inplace: bool = False) -> Tensor:
    """Apply a `topk_threshold` to x, or to a block of its rows starting at flat `offset`."""
    thr, cut = float(info[0]), int(info[1])
    out = x if _inplace else torch.empty_like(x)
    src, dst = x.reshape(-1), out.reshape(-1)
    n = src.numel()
    buf = torch.empty(min(n, SUB_CHUNK), dtype=x.dtype, device=x.device)
    # NOTE: in cache-sized sub-chunks: keep = (|x| > thr) as 1.0/0.0, then x * keep
    # (the same products, signed zeros included, as multiplying by a boolean mask).
    for s in range(0, n, SUB_CHUNK):
        e = min(n, s + SUB_CHUNK)
        a = torch.abs(src[s:e], out=buf[:e - s])
        ties_end = min(max(cut - offset - s, 0), e - s)  # entries equal to thr before `cut` are kept too
        if ties_end:
            a[:ties_end].ge_(thr)
        if ties_end < e - s:
            a[ties_end:].gt_(thr)
        torch.mul(src[s:e], a, out=dst[s:e])
    return out


_STEP = 1 << 22


def kth_largest_magnitude(x, k: int) -> tuple[float, int]:
    """The k-th largest |x| and how many entries are strictly larger, exactly."""
    value, above, _ = _kth_largest(x.reshape(-1), k, want_cut=False)
    return value, above


def _kth_largest(flat, k: int, want_cut: bool) -> tuple[float, int, int]:
    """(v, above, cut): the k-th largest |flat|, how many entries are strictly larger,
    and one past the flat index of the (k - above)-th entry equal to v (0 unless
    want_cut), exactly.

    NOTE: no sort and no full-size temporaries. A strided sample brackets the answer;
    one streaming pass in cache-sized sub-chunks counts the entries above the bracket
    and gathers the (few) values inside it; the selection then runs on the bracket only,
    and the tie positions come from a re-scan for the threshold value. When the bracket
    misses (rare), an exact two-level histogram over the float32 bits of |x| (which
    order like int32) finds the value.
    """
    n = flat.numel()
    if n < (1 << 16):
        a = flat.abs()
        value = float(torch.kthvalue(a, n - k + 1).values)
        above = int(torch.count_nonzero(a > value))
        return value, above, (_tie_cut(flat, value, k - above, n) if want_cut else 0)
    # NOTE: a sparser sample for big tensors: the bracket stays a small fraction of the
    # tensor, and the sample read and its selections get cheaper.
    stride = 128 if n >= (1 << 22) else 32
    sample = flat[::stride].abs()
    m = sample.numel()
    target = (n - k) / n * m  # the answer's position in the sorted sample
    margin = 4.0 * (m * (k / n) * (1 - k / n)) ** 0.5 + 8
    lo_i, hi_i = max(1, int(target - margin)), min(m, int(target + margin) + 1)
    lo = float(torch.kthvalue(sample, lo_i).values)
    hi = float(torch.kthvalue(sample, hi_i).values)
    del sample
    # One pass: entries above the bracket are counted; those inside it are counted per
    # sub-chunk and (unless the bracket is a single value, typical of many ties) kept.
    # NOTE: comparisons write 1.0/0.0 into float buffers and are counted with sum():
    # much faster than boolean results on CPU, and exact at this sub-chunk size.
    above, counts, vals = 0, [], []
    buf = torch.empty(min(n, SUB_CHUNK), dtype=flat.dtype, device=flat.device)
    hit = torch.empty_like(buf)
    hit2 = torch.empty_like(buf) if lo != hi else None
    for s in range(0, n, SUB_CHUNK):
        m = min(n - s, SUB_CHUNK)
        a = torch.abs(flat[s:s + m], out=buf[:m])
        above += int(torch.gt(a, hi, out=hit[:m]).sum())
        if lo == hi:
            c = int(torch.eq(a, lo, out=hit[:m]).sum())
        else:
            sel = torch.ge(a, lo, out=hit[:m]).mul_(torch.le(a, hi, out=hit2[:m]))
            c = int(sel.sum())
            vals.append(a[sel.bool()] if c else None)
        counts.append(c)
    total_inside = sum(counts)
    if above < k <= above + total_inside:
        r = k - above  # the answer is the r-th largest inside the bracket
        if lo == hi:
            value, eq_counts = lo, counts
        else:
            inside = torch.cat([v for v in vals if v is not None])
            value = float(torch.kthvalue(inside, inside.numel() - r + 1).values)
            above += int(torch.count_nonzero(inside > value))
            del inside
            eq_counts = [int(torch.count_nonzero(v == value)) if v is not None else 0 for v in vals]
        return value, above, (_tie_cut(flat, value, k - above, SUB_CHUNK, eq_counts) if want_cut else 0)
    value, above = _kth_largest_hist(flat, k)
    return value, above, (_tie_cut(flat, value, k - above, 1 << 20) if want_cut else 0)


def _tie_cut(flat, value: float, need: int, step: int, counts: list[int] | None = None) -> int:
    """One past the flat index of the `need`-th entry (in flat order) with |x| == value.

    Scans in chunks of `step` (so many ties never need a big index tensor); chunks whose
    tie counts are known (`counts`, from the bracket pass) are skipped without a scan."""
    for j, s in enumerate(range(0, flat.numel(), step)):
        if counts is not None and need > counts[j]:
            need -= counts[j]
            continue
        eq = flat[s:s + step].abs() == value
        c = int(torch.count_nonzero(eq))
        if need > c:
            need -= c
            continue
        return s + int(torch.nonzero(eq).reshape(-1)[need - 1]) + 1
    raise AssertionError("fewer ties than counted")


def _kth_largest_hist(flat, k: int) -> tuple[float, int]:
    """Exact k-th largest |flat| from two streaming histograms: 32768 buckets on the high
    16 bits of the float32 pattern, then 65536 on the low 16 bits of the one bucket
    that holds the answer."""
    n = flat.numel()
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


class _MaskCache:
    """Recently drawn DARE mask chunks, bit-packed (32 KiB per chunk), least recently
    used first out. The L1 rescale needs each mask twice (for the factor, then to apply
    it, possibly in row blocks of a later group); drawing is the expensive part.

    NOTE: the packed chunks live in slots of one preallocated array (outside the malloc
    heap): thousands of small long-lived arrays scattered between the per-tile buffers
    fragmented the heap, and anonymous memory grew by ~1 MB per chunk drawn.
    """

    def __init__(self, max_bytes: int = 96 << 20):
        from collections import OrderedDict

        self.slots = max(1, max_bytes // (_MASK_CHUNK // 8))
        self.items: OrderedDict = OrderedDict()  # key -> slot
        self.store = None
        self.free: list[int] = []

    def get(self, key):
        slot = self.items.get(key)
        if slot is None:
            return None
        self.items.move_to_end(key)
        return self.store[slot]

    def put(self, key, mask) -> None:
        import numpy as np

        if self.store is None:
            self.store = np.empty((self.slots, _MASK_CHUNK // 8), dtype=np.uint8)
            self.free = list(range(self.slots - 1, -1, -1))
        if not self.free:
            _, slot = self.items.popitem(last=False)
            self.free.append(slot)
        slot = self.free.pop()
        self.store[slot] = np.packbits(mask)
        self.items[key] = slot


_MASKS = _MaskCache()


def _mask_chunk(j: int, density: float, seed: int, a: int = 0, b: int = _MASK_CHUNK):
    """Entries [a, b) of chunk j of the keep-mask, as a numpy bool array.

    NOTE: the draw is specified, not an accident of a library: 16-bit words from numpy's
    SFC64 generator seeded with tensor_seed(seed, str(j)) (the raw 64-bit outputs split
    into four little-endian words), and an entry is kept iff its word < round(density *
    65536). So the keep probability is density to within 2**-17, and drawing costs about
    1 ns per entry (MT19937 float draws cost 4-5 ns).
    """
    import numpy as np

    limit = keep_limit(density)
    key = (seed, j, limit)
    packed = _MASKS.get(key)
    if packed is None:
        words = np.random.Generator(np.random.SFC64(tensor_seed(seed, str(j)))).bit_generator.random_raw(
            _MASK_CHUNK // 4).view("<u2")
        mask = words < limit
        _MASKS.put(key, mask)
        return mask[a:b]
    # only the bytes that hold [a, b): a tile uses a slice of a chunk
    bits = np.unpackbits(packed[a // 8:(b + 7) // 8]).view(np.bool_)
    return bits[a % 8:a % 8 + b - a]


def keep_limit(density: float) -> int:
    """A mask word (0..65535) keeps its entry iff it is below this."""
    return min(1 << 16, max(0, round(density * (1 << 16))))


def keep_mask_float(offset: int, n: int, density: float, seed: int, out, value: float = 1.0):
    """DARE's Bernoulli(density) keep-mask for flat positions [offset, offset + n), written
    as value/0 into `out` (float, n entries; CPU).

    NOTE: drawn in fixed chunks of the flattened tensor, each from its own generator
    seeded by (seed, chunk), on the CPU: the mask of a row block or tile equals that
    slice of the whole tensor's mask, so results are bit-identical however the plan is
    split, tiled, run or ordered, and on any device.

    NOTE: multiplying by a float value/0 mask gives the same products as multiplying by
    a boolean mask and then by the value (signed zeros included: value > 0) and is
    several times faster on CPU.
    """
    import numpy as np

    first, last = offset // _MASK_CHUNK, (offset + n - 1) // _MASK_CHUNK
    pos = 0
    for j in range(first, last + 1):
        a = max(offset - j * _MASK_CHUNK, 0)
        b = min(offset + n - j * _MASK_CHUNK, _MASK_CHUNK)
        bits = torch.from_numpy(_mask_chunk(j, density, seed, a, b).view(np.uint8))
        if value == 1.0:
            out[pos:pos + b - a].copy_(bits)
        else:
            torch.mul(bits, value, out=out[pos:pos + b - a])
        pos += b - a
    return out[:n]


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


# Elements per partial sum of the L1 statistic: each chunk of the flattened tensor is summed
# in float32 on its own, and the chunk sums are added exactly (math.fsum). Tiles start at
# multiples of it, so a tiled run sums the very same chunks as a whole-tensor one.
# (Below torch's parallel grain size: a chunk's sum does not depend on the thread count.)
STAT_CHUNK = 1 << 14


def _l1_partials(x: Tensor, offset: int = 0, density: float = 0.5, seed: int = 0) -> list[list[float]]:
    """Per-chunk float32 sums of |x| and of |x * mask| for x at flat `offset` (a
    multiple of STAT_CHUNK), as two lists of Python floats.

    NOTE: Python floats, not small tensors: a tensor per tile kept until the end of the
    tensor pinned the malloc heap between the tiles' buffers, and anonymous memory grew
    by gigabytes on an embedding (pymalloc keeps small objects in its own arenas)."""
    flat = x.reshape(-1)
    n = flat.numel()
    step = max(STAT_CHUNK, SUB_CHUNK // STAT_CHUNK * STAT_CHUNK)
    sums = torch.empty(2, -(-n // STAT_CHUNK), dtype=x.dtype, device=x.device)
    buf = torch.empty(min(step, n), dtype=x.dtype, device=x.device)
    mbuf = torch.empty(min(step, n), dtype=x.dtype)
    for s in range(0, n, step):
        m = min(step, n - s)
        a = torch.abs(flat[s:s + m], out=buf[:m])
        _chunk_sums(a, sums[0], s // STAT_CHUNK)
        a.mul_(keep_mask_float(offset + s, m, density, seed, mbuf).to(x.device))
        _chunk_sums(a, sums[1], s // STAT_CHUNK)
    return sums.tolist()


def _chunk_sums(a, out, first: int) -> None:
    """out[first + c] = float32 sum of chunk c of a (the last chunk may be short)."""
    whole = a.numel() // STAT_CHUNK
    if whole:
        torch.sum(a[:whole * STAT_CHUNK].view(whole, STAT_CHUNK), 1, out=out[first:first + whole])
    if whole * STAT_CHUNK < a.numel():
        torch.sum(a[whole * STAT_CHUNK:], 0, out=out[first + whole])


def _l1_finish(partials: list, density: float = 0.5, seed: int = 0) -> Tensor:
    import math

    before = math.fsum(v for p in partials for v in p[0])
    after = math.fsum(v for p in partials for v in p[1])
    return torch.tensor(before / after if after > 0 else 1.0, dtype=torch.float64)


@op(public=False, tile_stat=(_l1_partials, _l1_finish))
def drop_l1_factor(x: Tensor, density: float = 0.5, seed: int = 0) -> Tensor:
    """sum|x| / sum|x * mask|: the factor that restores the L1 norm after the drop.

    A tile statistic: the executor can compute it tile by tile (`_l1_partials` per
    tile, `_l1_finish` at the end) with the same bits as on the whole tensor."""
    return _l1_finish([_l1_partials(x, 0, density, seed)], density, seed)


@op(public=False, inplace=True)
def drop_rows(x: Tensor, factor: Tensor, density: float = 0.5, seed: int = 0, offset: int = 0,
              _inplace: bool = False) -> Tensor:
    """x * mask * factor for x, or for a block of its rows starting at flat `offset`."""
    if density >= 1.0:
        return x
    # NOTE: the factor is folded into the mask (factor/0): x * (mask * f) has the bits
    # of (x * mask) * f in float32, and costs one pass less.
    f = float(factor)
    mask = keep_mask_float(offset, x.numel(), density, seed, torch.empty(x.numel(), dtype=x.dtype), f)
    mask = mask.reshape(x.shape).to(x.device)
    return x.mul_(mask) if _inplace else x * mask


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
