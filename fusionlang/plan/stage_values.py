"""Data values and model stages as the evaluator sees them.

`dataset(...)` / `zoo_data(...)` evaluate to a `DataV` (checked against the files when
not dry: missing file, unknown column, too few rows are located errors at compile time).
`gram(models, data)` / `fisher(models, data)` register one model stage per (model, data)
pair as a source of the plan, whose tensors are the statistics (shapes derived from the
model's architecture on the meta device), and evaluate, per tensor name, to a list of
loads of those statistics, with `UNCOVERED` for a tensor the statistic does not cover
(e.g. a LayerNorm weight has no Gram matrix). `covered(stats)` tests for that, so the
stdlib can fall back to another formula for such tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import ir
from ..lang.diagnostics import Span
from .graph import SourceSpec, shape_numel
from .values import EvalError, TensorCtx, TensorV, at

STAGE_BUILTINS = {"dataset", "zoo_data", "gram", "gram_plusplus", "pruning_stats", "fisher", "adamerging_coefficients",
                  "covered"}


@dataclass(frozen=True)
class DataV:
    """A data value: its description (stages.data) and the call that made it."""

    spec: dict
    span: Span
    arg_spans: tuple[tuple[str, Span], ...] = ()

    def span_of(self, arg: str | None) -> Span:
        return dict(self.arg_spans).get(arg, self.span) if arg else self.span


class _Uncovered:
    def __repr__(self) -> str:
        return "UNCOVERED"


UNCOVERED = _Uncovered()


def call(ev, e: ir.CallE, args: dict, ctx: TensorCtx, env: tuple = ()):
    """Evaluate a stage builtin call `e` (arguments `args`) at tensor `ctx`; `env` the
    enclosing def's locals, so a bad argument is reported where the user wrote it."""
    ev.__dict__["_stage_env"] = env
    if e.target in ("dataset", "zoo_data"):
        return _data(ev, e, args)
    if e.target == "covered":
        stats = args["stats"]
        return isinstance(stats, list) and all(isinstance(x, TensorV) for x in stats)
    if e.target == "adamerging_coefficients":
        return _adamerging(ev, e, args, ctx)
    if e.target == "gram_plusplus":
        return _gram_plusplus(ev, e, args, ctx)
    return _stats(ev, e, args, ctx)


def _arg_spans(ev, e: ir.CallE) -> tuple[tuple[str, Span], ...]:
    from ..lang.signatures import BUILTINS

    names = [p[0] for p in BUILTINS[e.target].params]
    env = ev.__dict__.get("_stage_env", ())

    def where(a: ir.Expr) -> Span:  # through a def's parameter, the user's argument
        origin = ev._param_origin(a, env)
        return origin.span if origin is not None else a.span

    return tuple((n, where(a)) for n, a in zip(names, e.args)) + tuple((k, where(v)) for k, v in e.kwargs)


def _data(ev, e: ir.CallE, args: dict) -> DataV:
    from ..stages import data as D

    spec = D.from_args(e.target, args, e.span.file)
    v = DataV(spec, e.span, _arg_spans(ev, e))
    if not ev.dry:
        _check_data(ev, v)
    return v


def _check_data(ev, v: DataV):
    """The data's rows (loaded once per compile); EvalError for a bad data value."""
    from ..stages import data as D

    cache = ev.__dict__.setdefault("_data_checked", {})
    key = json.dumps(v.spec, sort_keys=True)
    if key not in cache:
        try:
            cache[key] = D.load(v.spec)
        except D.DataError as err:
            raise EvalError(err.code, err.message, v.span_of(err.arg), err.hint) from None
    return cache[key]


def _models_and_data(e: ir.CallE, args: dict, arg_span: dict) -> tuple[list, list]:
    models, data = args["models"], args["data"]
    if not isinstance(models, list) or not all(isinstance(m, TensorV) for m in models):
        raise EvalError("E005", f"{e.target}() takes a list of models", arg_span.get("models", e.span),
                        "pass a `models` list, or [m] for one model")
    datas = data if isinstance(data, list) else [data] * len(models)
    if not all(isinstance(d, DataV) for d in datas):
        raise EvalError("E005", f"the data of {e.target}() must be a data value or a list of them (one per model)",
                        arg_span.get("data", e.span), 'declare it: data calib = dataset("calib.jsonl", text="text")')
    if len(datas) != len(models):
        raise EvalError("E006", f"{len(datas)} data values for {len(models)} models in {e.target}()",
                        arg_span.get("data", e.span), "give one data value per model, or a single one for all")
    for d in datas:
        if d.spec["kind"] == "files" and not d.spec.get("text") and not d.spec.get("image"):
            raise EvalError("E006", f"{e.target}() runs the models on the data's inputs, and this data names none "
                            "(prompt= and answer= are for exact_match())", d.span,
                            'name the input column: dataset("calib.jsonl", text="prompt")')
    return models, datas


def _source_key(ev, e: ir.CallE, m: TensorV, span: Span) -> str:
    node = ev.plan.nodes[m.node]
    if node.op != "load":
        raise EvalError("E005", f"{e.target}() computes statistics of models read from files, not of a merge",
                        span, "save the merge first, or pass the input models")
    return node.param("source")


def _adamerging(ev, e: ir.CallE, args: dict, ctx: TensorCtx) -> list:
    arg_span = dict(_arg_spans(ev, e))
    models, datas = _models_and_data(e, args, arg_span)
    base = args["base"]
    if not isinstance(base, TensorV):
        raise EvalError("E005", "adamerging_coefficients() takes the pre-trained model as base", e.span,
                        "pass a model")
    p = {"mode": str(args.get("mode") or "task"), "steps": args.get("steps", 1000), "lr": args.get("lr", 0.001),
         "init": args.get("init", 0.3), "batch_size": args.get("batch_size", 16), "clamp": bool(args.get("clamp")),
         "seed": args.get("seed", 0)}
    bad = [("mode", p["mode"] not in ("task", "layer"), 'mode="task" (one coefficient per model) or "layer"'),
           ("steps", not _whole(p["steps"], 1), "e.g. steps=1000"),
           ("batch_size", not _whole(p["batch_size"], 1), "e.g. batch_size=16"),
           ("seed", not _whole(p["seed"], 0), "e.g. seed=0"),
           ("lr", not (isinstance(p["lr"], (int, float)) and p["lr"] > 0), "e.g. lr=0.001")]
    reject_bad(bad, p, arg_span, e, "adamerging")
    p.update(steps=int(p["steps"]), batch_size=int(p["batch_size"]), seed=int(p["seed"]), lr=float(p["lr"]),
             init=float(p["init"]))
    if ev.dry:
        return [TensorV(ev.plan.add("load", (), {"source": e.target, "tensor": ctx.tensor}, group=ctx.group), None, None)]
    base_key = _source_key(ev, e, base, arg_span.get("base", e.span))
    keys = [_source_key(ev, e, m, arg_span.get("models", e.span)) for m in models]
    memo = ev.__dict__.setdefault("_stages", {})
    mkey = (e.target, base_key, tuple(keys), json.dumps([d.spec for d in datas], sort_keys=True),
            json.dumps(p, sort_keys=True))
    if mkey not in memo:
        memo[mkey] = _register_adamerging(ev, e, base_key, keys, datas, p)
    sk = memo[mkey]
    return [ev.load(sk, ctx, e.span) if ctx.tensor in ev.plan.sources[sk].tensors else UNCOVERED]


def _gram_plusplus(ev, e: ir.CallE, args: dict, ctx: TensorCtx) -> list:
    arg_span = dict(_arg_spans(ev, e))
    models, datas = _models_and_data(e, args, arg_span)
    alpha, bs = args.get("alpha", 0.95), args.get("batch_size", 32)
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise EvalError("E006", f"alpha={alpha!r} must be within [0, 1]", arg_span.get("alpha", e.span), "e.g. alpha=0.95")
    if not _whole(bs, 1):
        raise EvalError("E006", f"batch_size={_show(bs)} must be a whole number of at least 1",
                        arg_span.get("batch_size", e.span), "e.g. batch_size=32")
    p = {"alpha": float(alpha), "batch_size": int(bs), "include_padding": bool(args.get("include_padding", False))}
    if ev.dry:
        return [TensorV(ev.plan.add("load", (), {"source": e.target, "tensor": ctx.tensor}, group=ctx.group), None, None)
                for _ in models]
    keys = [_source_key(ev, e, m, arg_span.get("models", e.span)) for m in models]
    memo = ev.__dict__.setdefault("_stages", {})
    mkey = (e.target, tuple(keys), json.dumps([d.spec for d in datas], sort_keys=True), json.dumps(p, sort_keys=True))
    if mkey not in memo:
        memo[mkey] = _register_joint(ev, e, keys, datas, p)
    return [ev.load(sk, ctx, e.span) if ctx.tensor in ev.plan.sources[sk].tensors else UNCOVERED for sk in memo[mkey]]


def _register_joint(ev, e: ir.CallE, keys: list[str], datas: list, p: dict) -> list[str]:
    """One joint stage computing every model's statistics; one plan source per model."""
    from ..stages import models as M
    from ..stages import regmean_pp as R
    from ..stages.data import DataError, describe

    first = ev.plan.sources[keys[0]]
    for d in datas:
        _check_data(ev, d)
    try:
        for k, d in zip(keys, datas):
            M.check_fits(ev.plan.sources[k].path, d.spec, needs_logits=False)
        sm = M.build(first.path, datas[0].spec, "cpu", meta=True)
    except DataError as err:
        raise EvalError(err.code, err.message, e.span, err.hint) from None
    shapes = R.covered(sm)
    if not shapes:
        raise EvalError("E014", f"gram_plusplus() found no Linear or Conv2d layer inside a numbered layer stack of "
                        f"'{keys[0]}'", e.span, "use regmean() for this model")
    n = len(keys)
    layers = len({R.layer_index(t)[1] for t in shapes})
    rows = sum(len(_check_data(ev, d)) for d in datas)
    model_bytes = sum(4 * shape_numel(s) for _, s, _ in first.tensors.values())
    joint = {"kind": "gram_plusplus", "model": keys[0], "model_dir": first.path, "models": keys,
             "model_dirs": [ev.plan.sources[k].path for k in keys], "data": [d.spec for d in datas],
             "data_text": ", ".join(describe(d.spec) for d in datas), "params": p,
             "estimate": {"examples": rows * layers, "batches": layers * sum(-(-len(_check_data(ev, d)) // p["batch_size"])
                                                                            for d in datas),
                          "batch_size": p["batch_size"], "passes": "forward", "models_resident": n,
                          "peak_bytes": model_bytes * (n + 2)}}
    out = []
    for i, k in enumerate(keys):
        sk = f"gram_plusplus[{k}]"
        while sk in ev.plan.sources:
            sk += "'"
        ev.plan.sources[sk] = SourceSpec(sk, "", {t: ("F32", tuple(s), "") for t, s in shapes.items()}, {}, at(e.span),
                                         {**joint, "index": i, "of": k})
        out.append(sk)
    return out


def reject_bad(bad: list[tuple[str, bool, str]], values: dict, arg_span: dict, e: ir.CallE, method: str) -> None:
    """E006 at the user's argument for the first (name, wrong, hint) of `bad` that is
    wrong: "name=value is not valid for method" (strings shown in double quotes)."""
    for name, wrong, hint in bad:
        if wrong:
            v = values[name]
            shown = json.dumps(v) if isinstance(v, str) else _show(v)
            raise EvalError("E006", f"{name}={shown} is not valid for {method}", arg_span.get(name, e.span), hint)


def _show(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


def _whole(v, lo: int) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) and v >= lo


def _register_adamerging(ev, e: ir.CallE, base_key: str, keys: list[str], datas: list, p: dict) -> str:
    from ..stages import models as M
    from ..stages.data import DataError, describe

    base = ev.plan.sources[base_key]
    for d in datas:
        _check_data(ev, d)
        try:
            M.check_fits(base.path, d.spec, needs_logits=True)
        except DataError as err:
            raise EvalError(err.code, err.message, d.span_of(err.arg) if err.arg else e.span, err.hint) from None
    n = len(keys)
    tensors = {t: ("F32", (n,), "") for t, (dtype, _shape, _f) in base.tensors.items() if dtype in ("F32", "F16", "BF16", "F64")}
    sk = f"adamerging[{base_key}]"
    while sk in ev.plan.sources:
        sk += "'"
    model_bytes = sum(4 * shape_numel(s) for _, s, _ in base.tensors.values())
    estimate = {"examples": p["steps"] * n * p["batch_size"], "batches": p["steps"] * n, "batch_size": p["batch_size"],
                "passes": "forward+backward", "models_resident": n + 1,
                "peak_bytes": model_bytes * (n + 3)}
    stage = {"kind": "adamerging", "model": base_key, "model_dir": base.path,
             "models": keys, "model_dirs": [ev.plan.sources[k].path for k in keys],
             "data": [d.spec for d in datas], "data_text": ", ".join(describe(d.spec) for d in datas),
             "params": p, "estimate": estimate}
    ev.plan.sources[sk] = SourceSpec(sk, "", tensors, {}, at(e.span), stage)
    return sk


def _stats(ev, e: ir.CallE, args: dict, ctx: TensorCtx) -> list:
    arg_span = dict(_arg_spans(ev, e))
    models, datas = _models_and_data(e, args, arg_span)
    bs = args.get("batch_size", 32)
    if not _whole(bs, 1):
        raise EvalError("E006", f"batch_size={_show(bs)} must be a whole number of at least 1",
                        arg_span.get("batch_size", e.span), "e.g. batch_size=32")
    order = args.get("batch_order", "length")
    if e.target == "fisher" and order not in ("length", "given"):
        raise EvalError("E006", f"batch_order={json.dumps(order)} is neither \"length\" nor \"given\"",
                        arg_span.get("batch_order", e.span),
                        "\"length\" batches rows of similar length together; \"given\" keeps the data's order")
    params = {"batch_size": int(bs), **(
        {"normalize": bool(args.get("normalize", True)), "minimal": float(args.get("minimal", 1e-6)),
         "batch_order": order}
        if e.target == "fisher" else {"include_padding": bool(args.get("include_padding", False))})}
    if e.target == "pruning_stats":
        params.update(_pruning_params(args, arg_span, e))
    out = []
    for m, d in zip(models, datas):
        if ev.dry:
            out.append(TensorV(ev.plan.add("load", (), {"source": e.target, "tensor": ctx.tensor}, group=ctx.group),
                               None, None))
            continue
        sk = _register(ev, e, _source_key(ev, e, m, arg_span.get("models", e.span)), d, params)
        if ctx.tensor in ev.plan.sources[sk].tensors:
            out.append(ev.load(sk, ctx, e.span))
        else:
            out.append(UNCOVERED)
    return out


def _register(ev, e: ir.CallE, model_key: str, d: DataV, params: dict) -> str:
    """The plan source key of the stage `e.target`(model, data; params), added once."""
    memo = ev.__dict__.setdefault("_stages", {})
    key = (e.target, model_key, json.dumps(d.spec, sort_keys=True), json.dumps(params, sort_keys=True))
    if key in memo:
        return memo[key]
    from ..stages import models as M
    from ..stages import statistics as S
    from ..stages.data import DataError, describe

    src = ev.plan.sources[model_key]
    ex = _check_data(ev, d)
    try:
        M.check_fits(src.path, d.spec, needs_logits=e.target == "fisher")
        sm = M.build(src.path, d.spec, "cpu", meta=True)
    except DataError as err:
        raise EvalError(err.code, err.message, d.span_of(err.arg) if err.arg else e.span, err.hint) from None
    if e.target == "pruning_stats":
        from ..stages import pruning as P

        shapes = P.covered(sm, params["method"])
    else:
        shapes = S.covered_shapes(e.target, sm)
    if not shapes:
        what = {"gram": "Linear or Conv2d layer", "pruning_stats": "Linear layer inside a numbered layer stack"}.get(
            e.target, "parameter on the path to the logits")
        raise EvalError("E014", f"{e.target}() found no {what} among the tensors of '{model_key}'", e.span,
                        "check that the model directory holds the weights of the architecture its config.json names")
    n = len(ex)
    batches = -(-n // params["batch_size"])
    if e.target == "pruning_stats":  # up to the stack once, then each layer twice (measure; after pruning)
        batches *= 1 + 2 * len({P.layer_index(t)[1] for t in shapes})
    model_bytes = sum(4 * shape_numel(s) for _, s in _param_shapes(sm))
    stat_bytes = sum(4 * shape_numel(s) for s in shapes.values())
    sk = f"{e.target}[{model_key}]"
    while sk in ev.plan.sources:
        sk += "'"
    estimate = {"examples": n, "batches": batches, "batch_size": params["batch_size"],
                "passes": "forward+backward" if e.target == "fisher" else "forward", "models_resident": 1,
                "peak_bytes": model_bytes * (3 if e.target == "fisher" else 1) + stat_bytes}
    stage = {"kind": e.target, "model": model_key, "model_dir": src.path, "data": d.spec, "data_text": describe(d.spec),
             "params": params, "estimate": estimate}
    ev.plan.sources[sk] = SourceSpec(sk, "", {t: ("F32", tuple(s), "") for t, s in shapes.items()}, {}, at(e.span),
                                     stage)
    memo[key] = sk
    return sk


def _pruning_params(args: dict, arg_span: dict, e: ir.CallE) -> dict:
    """pruning_stats()'s arguments, checked (E006 at the argument)."""
    from ..stages.pruning import METHODS

    p = {k: args.get(k, d) for k, d in (("method", "wanda"), ("prune_type", "unstructured"), ("sparsity_ratio", 0.5),
                                         ("n", 2), ("m", 4), ("blocksize", 128), ("percdamp", 0.01))}
    ratio, percdamp = p["sparsity_ratio"], p["percdamp"]
    bad = [("method", p["method"] not in METHODS, 'method="wanda" or "sparsegpt"'),
           ("prune_type", p["prune_type"] not in ("unstructured", "semistructured"),
            'prune_type="unstructured" (sparsity_ratio per row) or "semistructured" (n of every m)'),
           ("sparsity_ratio", not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0),
            "the fraction of each row's weights set to zero, e.g. sparsity_ratio=0.5"),
           ("m", not _whole(p["m"], 1), "the group size of n:m pruning, e.g. m=4"),
           ("n", not _whole(p["n"], 0) or (_whole(p["m"], 1) and p["n"] > p["m"]),
            "how many of every m consecutive weights are pruned: 0 <= n <= m, e.g. n=2, m=4"),
           ("blocksize", not _whole(p["blocksize"], 1), "SparseGPT's column block, e.g. blocksize=128"),
           ("percdamp", not (isinstance(percdamp, (int, float)) and percdamp >= 0),
            "the dampening added to the Gram matrix's diagonal, as a fraction of its mean, e.g. percdamp=0.01")]
    reject_bad(bad, p, arg_span, e, p["method"] if p["method"] in METHODS else "pruning")
    out = {**p, "sparsity_ratio": float(ratio), "percdamp": float(percdamp), "n": int(p["n"]), "m": int(p["m"]),
           "blocksize": int(p["blocksize"])}
    if out["method"] == "wanda":  # SparseGPT's own arguments: not in Wanda's plan or cache key
        del out["blocksize"], out["percdamp"]
    return out


def _param_shapes(sm):
    return [(n, tuple(p.shape)) for n, p in sm.module.named_parameters()]


