"""SciPy's BLAS dsyrk and LAPACK dsyevr / dsyevd, called without holding the GIL.

SciPy's Python wrappers (`scipy.linalg.eigh`, `scipy.linalg.blas.dsyrk`) keep the
interpreter lock for the whole call, so two threads computing decompositions run one
after the other. The same routines are exported to C by `scipy.linalg.cython_blas` /
`cython_lapack` (function pointers in `__pyx_capi__`); called through ctypes, which
releases the GIL around a foreign call, several units of a plan decompose side by side
(runtime/scheduler.py). The routines are SciPy's own (its OpenBLAS build): the same
numbers as its wrappers give.

Arrays are float64 torch tensors on the CPU. LAPACK is column-major: a row-major [p, q]
tensor is the Fortran q × p matrix of its transpose, and a symmetric matrix is its own
transpose, so the Fortran upper triangle is the row-major lower one.
"""

from __future__ import annotations

import ctypes

from .registry import Tensor, torch

_P = ctypes.c_void_p
# routine -> (the scipy.linalg module exporting it, its number of arguments: all pointers)
_ROUTINES = {"dsyrk": ("cython_blas", 10), "dsyevr": ("cython_lapack", 21), "dsyevd": ("cython_lapack", 11)}
_FNS: dict[str, object] = {}


def _fn(name: str):
    """SciPy's C function for the routine `name` (`_ROUTINES`), or None."""
    f = _FNS.get(name)
    if f is None and name not in _FNS:
        module, nargs = _ROUTINES[name]
        try:
            import importlib

            capsule = importlib.import_module(f"scipy.linalg.{module}").__pyx_capi__[name]
            # NOTE: private prototypes: ctypes.pythonapi's own attributes are process-wide
            get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
            get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
                ("PyCapsule_GetPointer", ctypes.pythonapi))
            ptr = get_pointer(capsule, get_name(capsule))
            f = ctypes.CFUNCTYPE(None, *([_P] * nargs))(ptr)  # NOTE: CFUNCTYPE releases the GIL per call
        except (ImportError, KeyError, AttributeError, ValueError):
            f = None
        _FNS[name] = f
    return f


def available() -> bool:
    """Whether SciPy's dsyrk, dsyevr and dsyevd can be called here."""
    return all(_fn(name) is not None for name in _ROUTINES)


def _check(a: Tensor) -> None:
    """Raise ValueError unless `a` is a float64 CPU matrix these routines can read as is."""
    if a.dtype != torch.float64 or a.device.type != "cpu" or a.dim() != 2:
        raise ValueError(f"a float64 CPU matrix is needed, not {a.dtype} {tuple(a.shape)} on {a.device}")
    if not (a.is_contiguous() or a.T.is_contiguous()):
        raise ValueError("a row- or column-major matrix is needed (a contiguous tensor or its transpose)")


def _ptr(x) -> ctypes.c_void_p:
    return ctypes.c_void_p(x.data_ptr())


def _ints(*values: int):
    return [ctypes.c_int(int(v)) for v in values]


def _c(s: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(s.encode())


def syrk(a: Tensor) -> Tensor:
    """G = a·aᵀ ([p, p] float64) for a float64 CPU matrix `a` [p, q], row- or
    column-major (a transposed view of a contiguous tensor): BLAS dsyrk on `a` as
    stored, no copy. Only G's row-major lower triangle (LAPACK's upper, `uplo="U"`) is
    defined, which is what `syevr` / `syevd` read."""
    _check(a)
    p, q = a.shape
    g = torch.empty(p, p, dtype=torch.float64)
    if p == 0 or q == 0:
        return g.zero_()
    if a.T.is_contiguous():  # column-major: Fortran sees a itself, [p, q], lda = p
        src, trans, lda = a.T, "N", p
    else:
        src, trans, lda = a.contiguous(), "T", q  # row-major: Fortran sees aᵀ [q, p]
    n, k, ld, ldc = _ints(p, q, lda, p)
    alpha, beta = ctypes.c_double(1.0), ctypes.c_double(0.0)
    _fn("dsyrk")(_c("U"), _c(trans), ctypes.byref(n), ctypes.byref(k), ctypes.byref(alpha),
                                     _ptr(src), ctypes.byref(ld), ctypes.byref(beta), _ptr(g), ctypes.byref(ldc))
    return g


def syevr(g: Tensor, first: int, last: int):
    """Eigenpairs `first`..`last` (0-based, inclusive, in ascending order) of the
    symmetric float64 matrix `g` [p, p] (its LAPACK upper triangle, `syrk`'s), by
    LAPACK dsyevr (MRRR): `(w [m] ascending, z [p, m])`, or None when LAPACK fails
    (info ≠ 0). `g` is overwritten."""
    _check(g)
    p = g.shape[0]
    count = last - first + 1
    if not 0 <= first <= last < p:
        raise ValueError(f"eigenpairs {first}..{last} of a {p} x {p} matrix")
    w = torch.empty(p, dtype=torch.float64)
    zt = torch.empty(count, p, dtype=torch.float64)  # Fortran [p, count], ldz = p
    isuppz = torch.empty(2 * count, dtype=torch.int32)
    n, lda, il, iu, m, ldz, info = _ints(p, p, first + 1, last + 1, 0, p, 0)
    vl, vu, abstol = ctypes.c_double(0.0), ctypes.c_double(0.0), ctypes.c_double(0.0)
    f = _fn("dsyevr")

    def call(work, lwork, iwork, liwork) -> None:
        f(_c("V"), _c("I"), _c("U"), ctypes.byref(n), _ptr(g), ctypes.byref(lda), ctypes.byref(vl), ctypes.byref(vu),
          ctypes.byref(il), ctypes.byref(iu), ctypes.byref(abstol), ctypes.byref(m), _ptr(w), _ptr(zt),
          ctypes.byref(ldz), _ptr(isuppz), _ptr(work), ctypes.byref(lwork), _ptr(iwork), ctypes.byref(liwork),
          ctypes.byref(info))

    return _solve(call, info, lambda: (w[:m.value], zt[:m.value].T) if m.value == count else None)


def syevd(g: Tensor):
    """All eigenpairs of the symmetric float64 matrix `g` [p, p] (its LAPACK upper
    triangle) by LAPACK dsyevd (divide and conquer): `(w [p] ascending, z [p, p])`, or
    None when LAPACK fails. `g` is overwritten by the eigenvectors (z is a view of it)."""
    _check(g)
    p = g.shape[0]
    if p == 0:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, 0, dtype=torch.float64)
    w = torch.empty(p, dtype=torch.float64)
    n, lda, info = _ints(p, p, 0)
    f = _fn("dsyevd")

    def call(work, lwork, iwork, liwork) -> None:
        f(_c("V"), _c("U"), ctypes.byref(n), _ptr(g), ctypes.byref(lda), _ptr(w), _ptr(work), ctypes.byref(lwork),
          _ptr(iwork), ctypes.byref(liwork), ctypes.byref(info))

    return _solve(call, info, lambda: (w, g.T))


def _solve(call, info: ctypes.c_int, result):
    """A LAPACK driver's workspace query (lwork = liwork = −1), then the call; `result()`
    when info = 0, else None."""
    work = torch.empty(1, dtype=torch.float64)
    iwork = torch.empty(1, dtype=torch.int32)
    lwork, liwork = _ints(-1, -1)
    call(work, lwork, iwork, liwork)
    if info.value != 0:
        return None
    lwork, liwork = _ints(int(work[0]) + 1, int(iwork[0]))
    work = torch.empty(lwork.value, dtype=torch.float64)
    iwork = torch.empty(max(1, liwork.value), dtype=torch.int32)
    call(work, lwork, iwork, liwork)
    return result() if info.value == 0 else None
