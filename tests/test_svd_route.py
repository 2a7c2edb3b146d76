"""The float64 Gram route for leading singular triplets and polar factors
(fusionlang/ops/svd.py `top_svd`, `polar`) and the methods that use it (TSV-M, Iso-CTS,
extract-LoRA's factors, SMILE's factors), against float64 LAPACK SVDs computed here:
the route must be at least as accurate as the float32 LAPACK SVD that MergeKit and
FusionBench call, and give way to LAPACK where the factors are not determined by the
matrix (a rank-deficient matrix, a zero one, repeated singular values at the cut,
linearly dependent blocks). Conformance with the references themselves is in
tests/test_fusionbench_methods.py, test_smile.py and test_extract_lora.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusionlang.ops import subspace
from fusionlang.ops.gram import polar, top_svd
from fusionlang.ops.svd import lora_factors, smile_factors


def _spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 [m, n] matrix with singular values `s` (min(m, n) of them) and random
    singular vectors."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return ((u * s.double()) @ v.T).float()


def _rank_k(x: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / float(b.double().abs().max())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 90), n=st.integers(2, 90), frac=st.floats(0.05, 1.0), smallest=st.floats(0.01, 0.9),
       seed=st.integers(0, 10**6))
def test_top_svd_is_the_best_rank_k_approximation(m, n, frac, smallest, seed):
    """Whatever the shape (tall, wide, square) and k, for singular values spread evenly
    from 1 down to `smallest`: U·diag(S)·Vh is the float64 best rank-k approximation (to
    the float32 rounding of the factors), U and Vh have orthonormal columns / rows, S are
    the float64 singular values."""
    r = min(m, n)
    x = _spectrum_matrix(m, n, torch.linspace(1.0, smallest, r), seed)
    k = max(1, int(min(m, n) * frac))
    top = top_svd(x, k)
    assert top is not None  # σ_k ≥ 1e-3·σ_1 and distinct singular values: the route is accurate here
    u, s, vh = top
    assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
    assert _rel((u * s) @ vh, _rank_k(x, k)) < 1e-6  # float32 storage of the factors
    torch.testing.assert_close(s.double(), torch.linalg.svdvals(x.double())[:k], rtol=1e-6, atol=0)
    torch.testing.assert_close(u.T.double() @ u.double(), torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(vh.double() @ vh.T.double(), torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)


def test_top_svd_gives_way_where_the_factors_are_not_determined():
    """None (the caller takes LAPACK's SVD) for: a zero matrix, a rank below k (σ_k = 0),
    σ_k < 1e-3·σ_1, a repeated singular value at the cut, a float64 or a 1-D input."""
    g = torch.Generator().manual_seed(0)
    assert top_svd(torch.zeros(8, 12), 2) is None
    for bad in (float("nan"), float("inf")):
        x = torch.randn(8, 12, generator=g)
        x[3, 4] = bad
        assert top_svd(x, 2) is None
    low = torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)
    assert top_svd(low, 3) is not None and top_svd(low, 4) is None
    decaying = _spectrum_matrix(30, 40, 0.5 ** torch.arange(30.0), 1)
    assert top_svd(decaying, 10) is not None and top_svd(decaying, 12) is None  # σ_12 = 0.5^11·σ_1 < 1e-3·σ_1
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    repeated = (q[:, :6] * torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64)) @ q[:, 6:12].T
    assert top_svd(repeated.float(), 2) is not None and top_svd(repeated.float(), 3) is None
    assert top_svd(repeated.float(), 1, cuts=(2,)) is not None and top_svd(repeated.float(), 2, cuts=(1,)) is not None
    assert top_svd(repeated.float(), 4, cuts=(3,)) is None  # the gap at a cut the caller also makes
    assert top_svd(torch.randn(6, 9, dtype=torch.float64), 2) is None
    assert top_svd(torch.randn(9), 1) is None


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30), (25, 20)])
def test_polar_is_the_nearest_orthonormal_matrix(shape):
    """P·Qᵀ and σ of a float64 SVD, to 1e-6, for tall, wide (the Gram route) and square
    (float32 LAPACK) matrices; the
    same from LAPACK for a badly conditioned one (σ_max / σ_min = 5e4); None for a
    rank-deficient one."""
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    p, s, qh = torch.linalg.svd(a.double(), full_matrices=False)
    got, sv = polar(a)
    assert got.dtype == sv.dtype == torch.float32
    # float32 LAPACK (nearly square: 1 in 10 random draws passes 1e-6 there) or the Gram route
    assert _rel(got, p @ qh) < (1e-5 if 2 * max(shape) < 3 * min(shape) else 1e-7)
    torch.testing.assert_close(sv.double(), s, rtol=1e-6, atol=1e-6 * float(s[0]))  # LAPACK float32: absolute
    r = min(shape)
    bad = _spectrum_matrix(*shape, torch.logspace(0, -4.7, r), 3)
    p, s, qh = torch.linalg.svd(bad.double(), full_matrices=False)
    got, sv = polar(bad)
    assert _rel(got, p @ qh) < 1e-2  # float32 LAPACK: ~eps32·σ_max/σ_min
    torch.testing.assert_close(sv.double(), s, rtol=1e-3, atol=1e-6)
    deficient = a.clone()
    if shape[0] >= shape[1]:
        deficient[:, 1] = deficient[:, 0]
    else:
        deficient[1] = deficient[0]
    assert polar(deficient) is None


def _tsv_float64(xs: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M's merged task vector (alpha 1) from float64 LAPACK SVDs, written from the
    paper's formulas: each task's k = r // T leading triplets, the polar factors of the
    concatenated U and Vᵀ blocks."""
    k = min(xs[0].shape) // len(xs)
    us, ss, vhs = [], [], []
    for x in xs:
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])

    def pol(a):
        p, _, qh = torch.linalg.svd(a, full_matrices=False)
        return p @ qh

    return (pol(torch.cat(us, 1)) * torch.cat(ss)) @ pol(torch.cat(vhs, 0))


def _float32_lapack(fn, *args, **kw):
    """`fn` with the Gram route switched off: every SVD is LAPACK's float32 one (the references')."""
    saved = (subspace.top_svd, subspace.polar)
    subspace.top_svd = lambda x, k: None
    subspace.polar = lambda a: None
    try:
        return fn(*args, **kw)
    finally:
        subspace.top_svd, subspace.polar = saved


@pytest.mark.parametrize("shape,n", [((96, 256), 3), ((256, 96), 4), ((128, 128), 2)])
def test_tsv_merge_is_more_accurate_than_float32_lapack(shape, n):
    """On noise-like task vectors (flat spectra: the hard case for singular vectors) TSV-M
    from the Gram route is closer to the float64 computation than the float32 LAPACK
    route that FusionBench takes (which the test also runs). One of the two
    concatenations is square (r × r), and its polar factor is LAPACK's float32 one in
    both routes (the Gram route is no faster there): that step bounds both errors."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(*shape, generator=g) * 0.02 for _ in range(n)]
    truth = _tsv_float64(xs)
    ours = subspace.tsv_merge(xs)
    lapack = _float32_lapack(subspace.tsv_merge, xs)
    assert _rel(ours, truth) < 4e-6
    assert _rel(ours, truth) < _rel(lapack, truth)


def test_tsv_merge_with_equal_task_vectors_is_lapacks_choice():
    """Two equal task vectors: the concatenated blocks are linearly dependent, the polar
    factor is not unique, and TSV-M is exactly the float32 LAPACK route's (FusionBench's
    choice, tests/test_fusionbench_methods.py's dup family)."""
    x = torch.randn(40, 24)
    xs = [x, x.clone(), torch.randn(40, 24)]
    assert torch.equal(subspace.tsv_merge(xs, alpha=0.5), _float32_lapack(subspace.tsv_merge, xs, alpha=0.5))


@pytest.mark.parametrize("fraction", [0.5, 0.0, 1.0])
def test_iso_cts_is_the_float64_value(fraction):
    """Iso-CTS from the Gram route against the same formulas in float64 LAPACK (common
    space of the sum, each task's projected residual, polar factors, mean spectrum),
    also with no common space (fraction 0) and no task-specific one (fraction 1)."""
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(64, 160, generator=g) * 0.02 for _ in range(4)]
    common, per_task = subspace.iso_cts_sizes(64, 160, 4, fraction)
    assert (common == 0) == (fraction == 0.0) and (per_task == 0) == (fraction == 1.0)
    total = sum(x.double() for x in xs)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    uc = u[:, :common]
    us, ss, vhs = [], [], []
    for x in xs:
        w = x.double()
        ut, st_, vht = torch.linalg.svd(w - uc @ (uc.T @ w), full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st_[:per_task])
        vhs.append(vht[:per_task])
    us.append(uc)
    ss.append(s[:common])
    vhs.append(vh[:common])
    pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
    pv, _, qv = torch.linalg.svd(torch.cat(vhs, 0), full_matrices=False)
    truth = (pu @ qu) @ (pv @ qv) * torch.cat(ss).mean()
    ours = subspace.iso_cts(xs, common_space_fraction=fraction)
    assert _rel(ours, truth) < 4e-6
    assert _rel(ours, truth) < _rel(_float32_lapack(subspace.iso_cts, xs, common_space_fraction=fraction), truth)


@pytest.mark.parametrize("transpose", [False, True])
def test_lora_and_smile_factors_are_the_float64_ones(transpose):
    """extract-LoRA's B·A and SMILE's u·svh are Δ's float64 best rank-r approximation; a
    task vector of lower rank than asked falls back to LAPACK and is still exact."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(120, 48, generator=g)
    ft = base + 0.01 * torch.randn(120, 48, generator=g)
    d = (ft - base).double()
    d = d.T if transpose else d
    packed = lora_factors(base, ft, rank=6, transpose=transpose)
    r, (out, inn) = 6, d.shape
    a, b = packed[:r * inn].reshape(r, inn), packed[r * inn:].reshape(out, r)
    assert _rel(b @ a, _rank_k(d, 6)) < 1e-6
    if not transpose:
        packed = smile_factors(base, ft, k=5, gate_k=2)
        u, svh = packed[:120 * 5].reshape(120, 5), packed[120 * 5:120 * 5 + 5 * 48].reshape(5, 48)
        assert _rel(u @ svh, _rank_k(d, 5)) < 1e-6
    low = base + (torch.randn(120, 2, generator=g) @ torch.randn(2, 48, generator=g)) * 0.01
    d = (low - base).double()
    d = d.T if transpose else d
    packed = lora_factors(base, low, rank=4, transpose=transpose)
    a, b = packed[:4 * d.shape[1]].reshape(4, d.shape[1]), packed[4 * d.shape[1]:].reshape(d.shape[0], 4)
    assert _rel(b @ a, d) < 1e-5


def test_iso_c_is_the_float64_value_and_lapacks_where_the_sum_is_rank_deficient():
    """Iso-C = mean(S)·U·Vᵀ of the sum of task vectors: for a non-square sum, from the
    Gram route within 1e-6 of float64 LAPACK and closer to it than float32 LAPACK; for a
    square one, float32 LAPACK's; for a sum of rank 2 (U·Vᵀ
    not unique) exactly the float32 LAPACK route's value (FusionBench's choice)."""
    g = torch.Generator().manual_seed(4)
    for shape in ((48, 130), (130, 48), (64, 64)):
        xs = [torch.randn(*shape, generator=g) * 0.02 for _ in range(3)]
        u, s, vh = torch.linalg.svd(sum(x.double() for x in xs), full_matrices=False)
        truth = (u @ vh) * s.mean()
        ours, lapack = subspace.iso_c(xs), _float32_lapack(subspace.iso_c, xs)
        if shape[0] == shape[1]:  # a square sum: LAPACK's float32 SVD (the Gram route is no faster)
            assert _rel(ours, lapack) < 1e-6 and _rel(ours, truth) < 1e-5
        else:
            assert _rel(ours, truth) < 1e-6
            assert _rel(ours, truth) < _rel(lapack, truth)
    low = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    xs = [low, torch.randn(40, 30, generator=g), None]
    xs[2] = -xs[1]
    assert torch.equal(subspace.iso_c(xs), _float32_lapack(subspace.iso_c, xs))
