"""`align(model, to=ref, ...)` and `wasserstein_barycenter(models, ...)` as the evaluator
sees them: one model stage (kind "align" or "barycenter", run by `stages.align`)
registered as a plan source whose tensors are the whole aligned (or fused) model, with
every tensor of the input's names, shapes and dtypes. The value, per tensor name, is a
load of that source, so the result is a model like any other: `linear([a, align(b,
to=a)], ...)` merges it with any stdlib method.

Checked at compile time, each at the argument at fault: the arguments' ranges (E006),
models read from files (E005), the same tensors and shapes (E014), a permutation spec for
the architecture that touches no axis twice and no residual stream (E014 / E006, from
`arch.permutation`), the data value and that the models run on it (as `gram`'s), and the
POT and scipy packages (E014).
"""

from __future__ import annotations

import json

from .. import ir
from . import stage_values as SV
from .graph import SourceSpec, shape_numel
from .values import EvalError, MissingTensor, TensorCtx, TensorV, at

ALIGN_BUILTINS = {"align", "wasserstein_barycenter"}
METHODS = ("weight", "emd", "sinkhorn")
SOLVERS = ("emd", "sinkhorn")


def call(ev, e: ir.CallE, args: dict, ctx: TensorCtx, env: tuple = ()) -> TensorV:
    """The value of an `align(...)` / `wasserstein_barycenter(...)` call at tensor `ctx`;
    `env` the enclosing def's locals, so a bad argument is reported where the user wrote it."""
    ev.__dict__["_stage_env"] = env
    span = dict(SV._arg_spans(ev, e))
    p = _params(e, args, span)
    if ev.dry:
        return TensorV(ev.plan.add("load", (), {"source": e.target, "tensor": ctx.tensor}, group=ctx.group), None, None)
    if e.target == "align":
        model, to = args["model"], args["to"]
        for name, v in (("model", model), ("to", to)):
            if not isinstance(v, TensorV):
                raise EvalError("E005", f"align() takes a model as {name}=", span.get(name, e.span),
                                "write align(b, to=a): b's units permuted to match a's")
        keys = [_key(ev, e, to, span.get("to", e.span)), _key(ev, e, model, span.get("model", e.span))]
        if keys[0] == keys[1]:
            return model  # a model aligned to itself is itself
        key_spans = [span.get("to", e.span), span.get("model", e.span)]
    else:
        models = args["models"]
        if not isinstance(models, list) or not all(isinstance(m, TensorV) for m in models) or len(models) < 2:
            raise EvalError("E005", "wasserstein_barycenter() takes a list of at least two models",
                            span.get("models", e.span), "write wasserstein_barycenter([a, b, c], ...)")
        keys = [_key(ev, e, m, span.get("models", e.span)) for m in models]
        key_spans = [span.get("models", e.span)] * len(keys)
        w = p.get("weights")
        if w is not None and len(w) != len(keys):
            raise EvalError("E006", f"{len(w)} weights for {len(keys)} models", span.get("weights", e.span),
                            "give one weight per model")
    memo = ev.__dict__.setdefault("_stages", {})
    data = args.get("data")
    mkey = (e.target, tuple(keys), json.dumps(data.spec if data is not None else None, sort_keys=True),
            json.dumps(p, sort_keys=True))
    if mkey not in memo:
        memo[mkey] = _register(ev, e, keys, key_spans, data, p, span)
    sk = memo[mkey]
    if ctx.tensor not in ev.plan.sources[sk].tensors:
        raise MissingTensor(sk, ctx.tensor, e.span)
    return ev.load(sk, ctx, e.span)


def _params(e: ir.CallE, args: dict, span: dict) -> dict:
    """The stage's parameters from the call's arguments; EvalError (E006) for a bad one."""

    def bad(name: str, hint: str):
        shown = json.dumps(args.get(name)) if isinstance(args.get(name), str) else repr(args.get(name))
        raise EvalError("E006", f"{name}={shown} is not valid for {e.target}()", span.get(name, e.span), hint)

    def whole(v, lo: int) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) and v >= lo

    p: dict = {}
    if e.target == "align":
        method = args.get("method", "weight")
        if method not in METHODS:
            bad("method", '"weight" (Git Re-Basin weight matching), "emd" or "sinkhorn" (OT fusion maps)')
        p["method"] = method
    else:
        solver = args.get("solver", "emd")
        if solver not in SOLVERS:
            bad("solver", '"emd" (exact transport) or "sinkhorn" (entropic)')
        p["method"] = solver
        w = args.get("weights")
        if w is not None and not (isinstance(w, list) and all(isinstance(x, (int, float)) and x >= 0 for x in w)
                                  and sum(w) > 0):
            bad("weights", "non-negative numbers, one per model, e.g. weights=[1, 1, 2]")
        p["weights"] = [float(x) for x in w] if w is not None else None
    soft = bool(args.get("soft", False))
    if soft and p["method"] == "weight":
        bad("soft", 'weight matching finds permutations; soft maps come from method="emd" or "sinkhorn"')
    p["soft"] = soft
    reg = args.get("reg", 0.01)
    if not (isinstance(reg, (int, float)) and not isinstance(reg, bool) and reg > 0):
        bad("reg", "a positive entropic regularisation, relative to the largest cost, e.g. reg=0.01")
    p["reg"] = float(reg)
    axes = args.get("axes")
    if axes is not None and not (isinstance(axes, list) and axes and all(isinstance(a, str) for a in axes)):
        bad("axes", 'a list of kinds of units, e.g. axes=["mlp"] or ["mlp", "heads"]')
    p["axes"] = list(axes) if axes is not None else None
    for name, default, lo, hint in (("max_iter", 100, 1, "e.g. max_iter=100"), ("seed", 0, 0, "e.g. seed=0"),
                                    ("batch_size", 32, 1, "e.g. batch_size=32"),
                                    ("max_samples", 20000, 1, "e.g. max_samples=20000")):
        v = args.get(name, default)
        if not whole(v, lo):
            bad(name, hint)
        p[name] = int(v)
    data = args.get("data")
    if e.target == "wasserstein_barycenter":
        p["reset_bn"] = bool(args.get("reset_bn", False))
        if p["reset_bn"] and data is None:
            bad("reset_bn", "BatchNorm statistics are re-estimated on data: give data=")
    if data is not None and p["method"] == "weight":
        bad("data", 'weight matching reads weights only: drop data=, or use method="emd" for activation matching')
    return p


def _key(ev, e: ir.CallE, m: TensorV, span) -> str:
    """The plan source of a model read from files; EvalError (E005) for a merge's value."""
    if ev.plan.nodes[m.node].op != "load":
        raise EvalError("E005", f"{e.target}() aligns models read from files, not the value of a merge", span,
                        "save the merge first and read it with local(...), or align its inputs")
    return SV._source_key(ev, e, m, span)


def _register(ev, e: ir.CallE, keys: list[str], key_spans: list, data, p: dict, span: dict) -> str:
    from ..arch import permutation as P
    from ..stages import align as A

    missing = A.missing_packages(p["method"], e.target)
    if missing:
        raise EvalError("E014", f"{e.target}() needs the Python package{'s' * (len(missing) > 1)} "
                        f"{' and '.join(missing)}, not installed", e.span, "pip install 'fusionlang[align]'")
    srcs = [ev.plan.sources[k] for k in keys]
    ref = srcs[0]
    shapes = {t: tuple(s) for t, (_d, s, _f) in ref.tensors.items()}
    for k, s, where in zip(keys[1:], srcs[1:], key_spans[1:]):
        other = {t: tuple(sh) for t, (_d, sh, _f) in s.tensors.items()}
        if other != shapes:
            diff = sorted(set(other) ^ set(shapes)) or sorted(t for t in shapes if other[t] != shapes[t])
            raise EvalError("E014", f"'{k}' and '{keys[0]}' differ in their tensors (e.g. '{diff[0]}'): alignment "
                            "permutes the units of one architecture", where,
                            "align models of the same architecture and sizes (trained from different seeds)")
    try:
        P.derive(ref.config or {}, shapes, tuple(p["axes"]) if p["axes"] is not None else None)
    except P.PermutationError as err:
        where = span.get(err.arg, e.span) if err.arg else key_spans[0]
        raise EvalError(err.code, f"'{keys[0]}': {err.message}", where, err.hint) from None
    rows = 0
    if data is not None:
        rows = _check(ev, e, data, [s.path for s in srcs], span)
    model_bytes = sum(4 * shape_numel(s) for s in shapes.values())
    n = len(keys)
    name = {"align": "align", "wasserstein_barycenter": "barycenter"}[e.target]
    stage = {"kind": name, "model": keys[-1] if name == "align" else keys[0], "model_dir": srcs[-1].path,
             "models": keys, "model_dirs": [s.path for s in srcs], "data": [data.spec] if data is not None else [],
             "data_text": _data_text(data, name, keys), "params": p,
             "estimate": {"examples": rows * n, "batches": n * -(-rows // p["batch_size"]) if rows else 0,
                          "batch_size": p["batch_size"], "passes": "forward" if rows else "no",
                          "models_resident": n, "peak_bytes": model_bytes * (n + 2)}}
    sk = f"{name}[{keys[-1] if name == 'align' else ','.join(keys)}]"
    while sk in ev.plan.sources:
        sk += "'"
    like = srcs[-1] if name == "align" else ref  # the result has the aligned model's (or the first's) dtypes
    ev.plan.sources[sk] = SourceSpec(sk, "", {t: (d, tuple(s), "") for t, (d, s, _f) in like.tensors.items()},
                                     like.config, at(e.span), stage)
    return sk


def _data_text(data, kind: str, keys: list[str]) -> str:
    from ..stages.data import describe

    what = f"to={keys[0]}" if kind == "align" else f"{len(keys)} models"
    return f"{what}, {describe(data.spec)}" if data is not None else what


def _check(ev, e: ir.CallE, data, dirs: list[str], span: dict) -> int:
    from ..stages import models as M
    from ..stages.data import DataError
    if not isinstance(data, SV.DataV):
        raise EvalError("E005", f"the data of {e.target}() must be a data value", span.get("data", e.span),
                        'declare it: data calib = zoo_data("fashion", zoo="nets", n=500)')
    ex = SV._check_data(ev, data)
    try:
        for d in dirs:
            M.check_fits(d, data.spec, needs_logits=False)
    except DataError as err:
        raise EvalError(err.code, err.message, data.span_of(err.arg) if err.arg else span.get("data", e.span),
                        err.hint) from None
    return len(ex)


