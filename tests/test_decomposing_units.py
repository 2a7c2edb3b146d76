"""Decomposing units side by side (runtime/scheduler.py, "Decomposing phases") and the
GIL-free LAPACK calls that make it pay (ops/lapack.py).

The LAPACK wrappers are checked against SciPy's own `eigh` and a float64 product; the
scheduler's side-by-side runs against one-thread runs of the same plans, byte for byte,
and on a failing unit (NaN input) for the located error and the absence of any output.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import load_state, make_family, run_cli, write_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from fusionlang.ops import lapack


@pytest.fixture
def threads():
    """Set torch's intra-op threads for one test (some modules leave it at 1)."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 40), q=st.integers(1, 40), column_major=st.booleans(), seed=st.integers(0, 2**16))
def test_lapack_wrappers_match_scipy(p, q, column_major, seed):
    assert lapack.available()
    gen = np.random.default_rng(seed)
    a_np = gen.standard_normal((p, q))
    a = torch.from_numpy(a_np.copy())
    if column_major:
        a = a.T.contiguous().T
        assert a.T.is_contiguous() and not a.is_contiguous() or p == 1 or q == 1
    g = lapack.syrk(a)
    exact = a_np @ a_np.T
    assert np.abs(np.tril(g.numpy()) - np.tril(exact)).max() <= 1e-12 * max(1.0, np.abs(exact).max())
    w_ref = scipy.linalg.eigh(exact, eigvals_only=True)
    w, z = lapack.syevd(g.clone())
    assert np.abs(w.numpy() - w_ref).max() <= 1e-11 * max(1.0, abs(w_ref).max())
    assert np.abs(exact @ z.numpy() - z.numpy() * w.numpy()).max() <= 1e-10 * max(1.0, abs(w_ref).max())
    assert np.abs(z.numpy().T @ z.numpy() - np.eye(p)).max() <= 1e-12
    first = p // 2
    w, z = lapack.syevr(g.clone(), first, p - 1)
    assert w.shape == (p - first,) and z.shape == (p, p - first)
    assert np.abs(w.numpy() - w_ref[first:]).max() <= 1e-11 * max(1.0, abs(w_ref).max())
    assert np.abs(exact @ z.numpy() - z.numpy() * w.numpy()).max() <= 1e-10 * max(1.0, abs(w_ref).max())


def test_lapack_wrappers_take_empty_matrices_and_refuse_other_dtypes():
    assert lapack.syrk(torch.zeros(0, 3, dtype=torch.float64)).shape == (0, 0)
    assert lapack.syrk(torch.zeros(2, 0, dtype=torch.float64)).abs().sum() == 0
    w, z = lapack.syevd(torch.zeros(0, 0, dtype=torch.float64))
    assert w.shape == (0,) and z.shape == (0, 0)
    with pytest.raises(ValueError, match="float64"):
        lapack.syrk(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="eigenpairs 2..3"):
        lapack.syevr(torch.eye(3, dtype=torch.float64), 2, 3)


def test_lapack_wrappers_fail_cleanly_on_nan():
    g = torch.eye(6, dtype=torch.float64)
    g[2, 2] = float("nan")
    for result in (lapack.syevd(g.clone()), lapack.syevr(g.clone(), 3, 5)):
        assert result is None or not bool(torch.isfinite(result[0]).all())


# `cp` copies the base: each of its tensors is a cast of the base's load in the unit that
# also adds the merged task vectors to that load (a value handed out before the last use
# of the buffer it shares)
MERGES = {"cp": "slices([layers(base, 0, 4)])", "tsv": "task_singular_vector(base, experts)",
          "iso": "iso_c_merge(base, experts)", "cts": "iso_cts_merge(base, experts)",
          "ta": "task_arithmetic(base, experts, scale=0.3)"}


def _spec(root, fam, out: str):
    experts = ", ".join(f'local("{fam[k]}")' for k in ("e0", "e1", "e2"))
    return write_spec(root, f'use merging\nmodel base = local("{fam["base"]}")\nmodels experts = [{experts}]\n'
                      + "".join(f'merge {n} = {m}\nsave {n} to "{out}/{n}"\n' for n, m in MERGES.items()),
                      f"{out}.fuse")


def test_side_by_side_units_give_the_one_thread_bytes(llama, tmp_path, threads, monkeypatch):
    """Two threads: the decomposing phase's units run side by side (the run says so) and
    every output tensor equals the one-thread run's, bit for bit; with
    FUSIONLANG_PARALLEL_UNITS=0 the same plan runs unit by unit."""
    threads(1)
    rc, _, err = run_cli("run", str(_spec(tmp_path, llama, "one")))
    assert rc == 0, err
    assert "side by side" not in err
    threads(2)
    rc, _, err = run_cli("run", str(_spec(tmp_path, llama, "two")))
    assert rc == 0, err
    units = 4 * 9 + 3  # per layer q, k, v, o, gate, up, down and two norms; embeddings, head, final norm
    assert f"{units} units computed side by side on 2 threads" in " ".join(err.split())
    for name in MERGES:
        one, two = load_state(tmp_path / "one" / name), load_state(tmp_path / "two" / name)
        assert one.keys() == two.keys()
        for k in one:
            assert torch.equal(one[k], two[k]), (name, k)
    base = load_state(llama["base"])
    assert load_state(tmp_path / "two" / "cp").keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in load_state(tmp_path / "two" / "cp").items())
    monkeypatch.setenv("FUSIONLANG_PARALLEL_UNITS", "0")
    rc, _, err = run_cli("run", str(_spec(tmp_path, llama, "serial")))
    assert rc == 0, err
    assert "side by side" not in err
    # decompositions compute on one thread wherever they run: two threads one unit at a
    # time give the same bytes too
    for name in MERGES:
        one, serial = load_state(tmp_path / "one" / name), load_state(tmp_path / "serial" / name)
        assert all(torch.equal(one[k], serial[k]) for k in one), name


def test_a_value_handed_out_is_never_updated_in_place(llama, tmp_path, threads, monkeypatch):
    """`karcher` of one model returns that model's buffer, and the unit then adds the base
    to it in place; the copy `cp` of the base, handed out before, must not change (the
    units run side by side, whose values are collected before they are written)."""
    threads(2)
    body = (f'use merging\nmodel base = local("{llama["base"]}")\n'
            f'models experts = [local("{llama["e0"]}"), local("{llama["e1"]}")]\n'
            'merge cp = base\nmerge k = karcher([base]) + base\nmerge tsv = task_singular_vector(base, experts)\n')
    for out in ("side", "serial"):
        if out == "serial":
            monkeypatch.setenv("FUSIONLANG_PARALLEL_UNITS", "0")
        spec = write_spec(tmp_path, body + "".join(f'save {n} to "{out}/{n}"\n' for n in ("cp", "k", "tsv")),
                          f"{out}.fuse")
        rc, _, err = run_cli("run", str(spec))
        assert rc == 0, err
        assert ("side by side" in err) == (out == "side")
    base = load_state(llama["base"])
    for out in ("side", "serial"):
        cp, k = load_state(tmp_path / out / "cp"), load_state(tmp_path / out / "k")
        assert all(torch.equal(v, base[key]) for key, v in cp.items()), out
        assert all(torch.equal(v, 2 * base[key]) for key, v in k.items() if v.is_floating_point()), out


def _poison(model_dir, tensor: str) -> None:
    """Write NaN into the first value of `tensor` (float32) in the model's safetensors file."""
    path = model_dir / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[start:start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))


def test_a_failing_unit_side_by_side_is_located_and_leaves_nothing(tmp_path, threads):
    fam = make_family(tmp_path / "fam", "llama", n_experts=3, seed=4)
    _poison(fam["e1"], "model.layers.2.mlp.up_proj.weight")
    threads(2)
    spec = _spec(tmp_path, fam, "out")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 1
    col = spec.read_text().splitlines()[2].index(f'local("{fam["e1"]}")') + 1
    assert f"{spec}:3:{col}: error[E031]: input model 'experts[1]' has 1 non-finite value" in err, err
    assert "in tensor 'model.layers.2.mlp.up_proj.weight'" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam", "out.fuse"]
    shutil.rmtree(tmp_path / "fam")
