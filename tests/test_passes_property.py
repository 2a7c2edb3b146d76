"""The optimizing passes never change a value: a property test over generated specs.

Each example is a random composition of the stdlib methods (average, linear,
task_arithmetic, ties, dare at density 1) and model arithmetic (+, -, k *, / k, lerp)
over 1-4 inputs with random weights (negative and zero included). It is compiled twice,
with no passes and with every pass, both plans are run on a tiny Llama family, and both
outputs are compared with each other and with an independent float32 torch evaluation
of the same expression written here from the methods' documented definitions
(docs/language.md), not from fusionlang's ops.

FUSIONLANG_PROPERTY_EXAMPLES sets the number of examples (default 40; thousands for a
long run).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import load_state, make_family
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionlang.lang.checker import check_file
from fusionlang.passes import run_passes
from fusionlang.plan.lower import Lowerer
from fusionlang.runtime.scheduler import run_plan

EXAMPLES = int(os.environ.get("FUSIONLANG_PROPERTY_EXAMPLES", "40"))
EXPERTS = ["e0", "e1", "e2", "e3"]
Ref = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Expr:
    text: str
    ref: Ref  # model name -> tensor (float32) => the expression's value for that tensor
    exact: bool = True  # False: a randomized or selection-heavy method, compared only optimized vs unoptimized


WEIGHT = st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.25, 2.0, 0.3, 1.5])
SCALE = st.sampled_from([0.0, 1.0, -0.5, 0.3, 2.0])


def _num(x: float) -> str:
    return repr(float(x))


def _leaf() -> st.SearchStrategy[Expr]:
    return st.sampled_from(["base", *EXPERTS]).map(lambda n: Expr(n, lambda v, n=n: v[n]))


def _unchecked(text: str) -> Expr:
    return Expr(text, lambda v: None, exact=False)


def _trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the max(1, int(density * numel)) largest magnitudes (MergeKit's count)."""
    flat = x.reshape(-1)
    k = 0 if density <= 0 else max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = True
    return (flat * keep).reshape(x.shape)


def _disjoint(xs: list[torch.Tensor], merge: str, weights: list[float] | None) -> torch.Tensor:
    """TIES: elected sign = sign of sum_i w_i x_i (0 -> +); agreeing entries w_i x_i e > 0
    combine by mean over the agreeing weights (0 -> 1), sum, or max magnitude."""
    w = weights or [1.0] * len(xs)
    e = torch.where(sum(wi * x for wi, x in zip(w, xs)) >= 0, 1.0, -1.0)
    agree = [(wi * x * e) > 0 for wi, x in zip(w, xs)]
    if merge == "max":
        return torch.stack([torch.where(a, wi * x * e, 0.0) for a, wi, x in zip(agree, w, xs)]).amax(0) * e
    total = sum(torch.where(a, wi * x, 0.0) for a, wi, x in zip(agree, w, xs))
    if merge == "sum":
        return total
    den = sum(torch.where(a, wi, 0.0) for a, wi in zip(agree, w))
    return total / torch.where(den == 0, 1.0, den)


@st.composite
def _method(draw, child: st.SearchStrategy[Expr]) -> Expr:
    """A method call or arithmetic over drawn sub-expressions; exact only when every
    sub-expression is."""
    drawn: list[Expr] = []

    def dc() -> Expr:
        drawn.append(draw(child))
        return drawn[-1]

    e = _method_of(draw, dc)
    return replace(e, exact=e.exact and all(c.exact for c in drawn))


def _method_of(draw, dc) -> Expr:
    kind = draw(st.sampled_from(["average", "linear", "ta", "ta_w", "ties", "dare1", "add", "sub", "mul", "div", "lerp",
                                 "dare", "breadcrumbs", "ties_model", "slerp"]))
    n = draw(st.integers(1, 4))
    ms = [dc() for _ in range(n)]
    lst = "[" + ", ".join(m.text for m in ms) + "]"
    ws = draw(st.lists(WEIGHT, min_size=n, max_size=n))
    wtext = f"weights=[{', '.join(map(_num, ws))}]"
    if kind == "slerp":
        t = draw(st.sampled_from([0.0, 0.3, 1.0]))
        return _unchecked(f"slerp({ms[0].text}, {ms[-1].text}, t={_num(t)})")
    if kind in ("dare", "breadcrumbs", "ties_model"):
        base, scale = dc(), draw(SCALE)
        density = draw(st.sampled_from([0.1, 0.5, 0.9]))
        opt = draw(st.sampled_from(["", f", {wtext}", ", consensus=true", f', consensus=true, merge="mean", {wtext}']))
        if kind == "dare":
            rescale = draw(st.sampled_from(["inverse", "l1", "none"]))
            return _unchecked(f'dare({base.text}, {lst}, density={_num(density)}, scale={_num(scale)}, '
                              f'rescale="{rescale}", seed={draw(st.integers(0, 3))}{opt})')
        if kind == "breadcrumbs":
            return _unchecked(f"breadcrumbs({base.text}, {lst}, density={_num(density)}, gamma=0.05, "
                              f"scale={_num(scale)}{opt})")
        return _unchecked(f'ties({base.text}, {lst}, density={_num(density)}, scale={_num(scale)}, scope="model", '
                          f'merge="{draw(st.sampled_from(["mean", "sum"]))}")')
    if kind == "average":
        return Expr(f"average({lst})", lambda v: sum(m.ref(v) for m in ms) / len(ms))
    if kind == "linear":
        ws = draw(st.lists(WEIGHT, min_size=n, max_size=n))
        normalize = draw(st.booleans()) and abs(sum(ws)) > 1e-6  # zero sums: test_weights_summing_to_zero
        text = f"linear({lst}, weights=[{', '.join(map(_num, ws))}], normalize={'true' if normalize else 'false'})"
        return Expr(text, lambda v: sum(w * m.ref(v) for w, m in zip(ws, ms)) / (sum(ws) if normalize else 1.0))
    base = dc()
    scale = draw(SCALE)
    if kind == "ta":
        return Expr(f"task_arithmetic({base.text}, {lst}, scale={_num(scale)})",
                    lambda v: base.ref(v) + scale * sum(m.ref(v) - base.ref(v) for m in ms))
    if kind == "ta_w":
        ws = draw(st.lists(WEIGHT, min_size=n, max_size=n))
        return Expr(f"task_arithmetic({base.text}, {lst}, scale={_num(scale)}, weights=[{', '.join(map(_num, ws))}])",
                    lambda v: base.ref(v) + scale * sum(w * (m.ref(v) - base.ref(v)) for w, m in zip(ws, ms)))
    if kind == "ties":
        density = draw(st.sampled_from([0.1, 0.5, 1.0]))
        merge = draw(st.sampled_from(["mean", "sum", "max"]))
        ws = draw(st.none() | st.lists(WEIGHT.filter(lambda w: w != 0), min_size=n, max_size=n))
        wtext = "" if ws is None else f", weights=[{', '.join(map(_num, ws))}]"
        return Expr(f'ties({base.text}, {lst}, density={_num(density)}, scale={_num(scale)}, merge="{merge}"{wtext})',
                    lambda v: base.ref(v) + scale * _disjoint([_trim(m.ref(v) - base.ref(v), density) for m in ms],
                                                              merge, ws))
    if kind == "dare1":  # density 1 keeps every entry: task arithmetic with weights
        ws = draw(st.lists(WEIGHT, min_size=n, max_size=n))
        return Expr(f"dare({base.text}, {lst}, density=1.0, scale={_num(scale)}, weights=[{', '.join(map(_num, ws))}])",
                    lambda v: base.ref(v) + scale * sum(w * (m.ref(v) - base.ref(v)) for w, m in zip(ws, ms)))
    a, b = ms[0], base
    if kind == "add":
        return Expr(f"({a.text} + {b.text})", lambda v: a.ref(v) + b.ref(v))
    if kind == "sub":
        return Expr(f"({a.text} - {b.text})", lambda v: a.ref(v) - b.ref(v))
    if kind == "mul":
        return Expr(f"({_num(scale)} * {a.text})", lambda v: scale * a.ref(v))
    if kind == "div":
        k = draw(st.sampled_from([0.5, -2.0, 4.0]))
        return Expr(f"({a.text} / {_num(k)})", lambda v: a.ref(v) * (1.0 / k))
    t = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    return Expr(f"lerp({a.text}, {b.text}, t={_num(t)})", lambda v: a.ref(v) + t * (b.ref(v) - a.ref(v)))


EXPRS = st.recursive(_leaf(), lambda child: _method(child), max_leaves=6).filter(lambda e: "(" in e.text)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("prop"), "llama", n_experts=4, hidden_size=16, intermediate_size=24,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=24)


def _run(spec: Path, passes: set[str] | None) -> None:
    plan = run_passes(Lowerer(check_file(str(spec))).lower(), passes, verify=True)
    run_plan(plan, "cpu")


def _spec(fam: dict[str, Path], expr: str, out: Path) -> str:
    models = "\n".join(f'model {n} = local("{fam[n]}")' for n in ["base", *EXPERTS])
    return f'use merging\n{models}\nmerge m = {expr}\nsave m to "{out}"\n'


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(expr=EXPRS)
def test_passes_preserve_values(family, expr):
    inputs = {n: load_state(p) for n, p in family.items()}
    with tempfile.TemporaryDirectory() as d:
        outs = {}
        for label, passes in (("none", set()), ("all", None)):
            spec = Path(d) / f"{label}.fuse"
            spec.write_text(_spec(family, expr.text, Path(d) / label))
            _run(spec, passes)
            outs[label] = load_state(Path(d) / label)
        for k, ref_in in inputs["base"].items():
            if not ref_in.is_floating_point():
                continue
            tol = 1e-5 * (1.0 + outs["none"][k].float().abs().max().item())
            if expr.exact:
                ref = expr.ref({n: sd[k].float() for n, sd in inputs.items()})
                for label in ("none", "all"):
                    got = outs[label][k].float()
                    assert (got - ref).abs().max().item() <= tol, (label, k, expr.text)
            assert (outs["none"][k].float() - outs["all"][k].float()).abs().max().item() <= tol, (k, expr.text)


def test_single_weighted_model_counts_once(family, tmp_path):
    """Case 01: a weighted merge of one model equals that merge of two models where the
    second has weight 0 (the fold pass once added the single input twice)."""
    one = _spec(family, "task_arithmetic(base, [e0], scale=1.0, weights=[0.5])", tmp_path / "one")
    two = _spec(family, "task_arithmetic(base, [e0, e1], scale=1.0, weights=[0.5, 0.0])", tmp_path / "two")
    lin = _spec(family, "linear([e0], weights=[3.0])", tmp_path / "lin")
    for name, text in (("one", one), ("two", two), ("lin", lin)):
        (tmp_path / f"{name}.fuse").write_text(text)
        _run(tmp_path / f"{name}.fuse", None)
    base, e0 = load_state(family["base"]), load_state(family["e0"])
    a, b, lin_out = load_state(tmp_path / "one"), load_state(tmp_path / "two"), load_state(tmp_path / "lin")
    for k in base:
        right = base[k] + 0.5 * (e0[k] - base[k])
        assert torch.allclose(a[k], right, atol=1e-6), k
        assert torch.equal(a[k], b[k]), k
        assert torch.allclose(lin_out[k], e0[k], atol=1e-6), k


def test_weights_summing_to_zero(family, tmp_path):
    """Case 01: normalize=true with weights summing to 0 is E006 at the user's weights,
    from check; nothing is written."""
    from conftest import run_cli

    spec = tmp_path / "zero.fuse"
    spec.write_text(_spec(family, "linear([e0, e1, e2], weights=[0.1, 0.2, -0.3])", tmp_path / "out"))
    rc, out, err = run_cli("check", str(spec))
    text = out + err
    assert rc == 1
    line = spec.read_text().splitlines().index(next(ln for ln in spec.read_text().splitlines() if ln.startswith("merge")))
    col = spec.read_text().splitlines()[line].index("[0.1") + 1
    assert f"zero.fuse:{line + 1}:{col}: error[E006]" in text and "sum to 0" in text and "normalize=false" in text
    rc, _, _ = run_cli("run", str(spec))
    assert rc == 1 and not (tmp_path / "out").exists()
    spec.write_text(_spec(family, "linear([e0, e1, e2], weights=[0.1, 0.2, -0.3], normalize=false)", tmp_path / "out"))
    rc, _, _ = run_cli("run", str(spec))
    assert rc == 0
    got, e = load_state(tmp_path / "out"), [load_state(family[n]) for n in ("e0", "e1", "e2")]
    for k in got:
        assert torch.allclose(got[k], 0.1 * e[0][k] + 0.2 * e[1][k] - 0.3 * e[2][k], atol=1e-6), k


def test_seeded_op_over_model_wide_statistic(family, tmp_path):
    """DARE over a scope="model" TIES: the DARE seed hashes an input that depends on a
    model-wide threshold not yet in the plan (was a KeyError found by the property
    test). The result equals t + 0.5 (e0 - t) where t is the TIES merge saved alone."""
    text = _spec(family, 'dare(ties(base, [e1], density=0.1, scope="model"), [e0], density=1.0, scale=0.5)',
                 tmp_path / "d")
    text += 'merge t = ties(base, [e1], density=0.1, scope="model")\n' + f'save t to "{tmp_path / "t"}"\n'
    (tmp_path / "s.fuse").write_text(text)
    _run(tmp_path / "s.fuse", None)
    d, t, e0 = load_state(tmp_path / "d"), load_state(tmp_path / "t"), load_state(family["e0"])
    for k in t:
        assert torch.allclose(d[k], t[k] + 0.5 * (e0[k] - t[k]), atol=1e-6), k
