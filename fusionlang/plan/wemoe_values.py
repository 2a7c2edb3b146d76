"""`wemoe(base, experts, data, ...)`: a weight-ensembling mixture of experts (WEMoE,
FusionBench `clip_weight_ensembling_moe`), as the evaluator sees it.

The output (`arch.wemoe`): task arithmetic with scale `init_lambda` outside the MLPs; each
MLP's Linear layers keep the base's weights and gain the experts' task vectors; each
MLP's router comes from a model stage (`stages.wemoe`, kind "wemoe") trained on the
unlabeled `data` (one data value per expert, or one for all). Written with a
description (`arch.upscaled`) that `fusionlang.load(dir)` and `eval` rebuild it from.
"""

from __future__ import annotations

from .. import arch, ir
from ..arch import upscaled as U
from ..arch import wemoe as W
from .graph import SourceSpec, shape_numel
from .smile_values import linears_of
from .values import PROBE, EvalError, TensorCtx, TensorV, at, builtin_exprs, builtin_options

PROBE_CTX = TensorCtx(PROBE, PROBE, 0, 2)
FLOATS = ("F32", "F16", "BF16", "F64")



def options(ev, call: ir.CallE) -> dict:
    """The call's arguments but the models, evaluated and checked; EvalError (E006) at
    the argument at fault."""
    o = builtin_options(ev, call, ("base", "experts"))
    span = o["spans"]

    def whole(v, lo: int) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v) and v >= lo

    checks = [("router_hidden_layers", not (whole(o["router_hidden_layers"], 0) and o["router_hidden_layers"] <= 2),
               "0 (a learned weight per expert), 1 or 2 (FusionBench's default) hidden layers"),
              ("steps", not whole(o["steps"], 1), "e.g. steps=1000 (FusionBench's max_steps)"),
              ("batch_size", not whole(o["batch_size"], 1), "e.g. batch_size=16"),
              ("seed", not whole(o["seed"], 0), "e.g. seed=0"),
              ("lr", not (isinstance(o["lr"], (int, float)) and not isinstance(o["lr"], bool) and o["lr"] > 0),
               "e.g. lr=1e-4"),
              ("init_lambda", not (isinstance(o["init_lambda"], (int, float)) and not isinstance(o["init_lambda"], bool)),
               "e.g. init_lambda=0.3")]
    for arg, wrong, hint in checks:
        if wrong:
            raise EvalError("E006", f"{arg}={o[arg]!r} is not valid for wemoe", span.get(arg, call.span), hint)
    for k in ("router_hidden_layers", "steps", "batch_size", "seed"):
        o[k] = int(o[k])
    o["lr"], o["init_lambda"] = float(o["lr"]), float(o["init_lambda"])
    return o


def domain(ev, call: ir.CallE) -> dict:
    """The output tensors of a `wemoe(...)` merge (the fields of a `domains.Domain`),
    registering the router stage. EvalError for a base without MLPs of a known layout,
    experts that are not models read from files, data that does not fit."""
    from ..stages import models as M
    from ..stages.data import DataError, describe
    from .stage_values import _check_data, _models_and_data, _source_key

    o = options(ev, call)
    exprs, span = builtin_exprs(call), o["spans"]
    base_call = ev.first_source(exprs["base"])
    if base_call is None:
        raise EvalError("E005", "wemoe() needs a base model", call.span, "write wemoe(base, experts, data, ...)")
    base_key = ev.source(base_call, ev.call_args(base_call, (), PROBE_CTX))
    h = ev.headers[base_key]
    shapes = {k: tuple(t.shape) for k, t in h.tensors.items()}
    groups = W.mlp_groups(linears_of(base_key, h, span.get("base", call.span), "WEMoE"))
    if not groups:
        known = "; ".join(" + ".join(g) for g in W.MLP_GROUPS)
        raise EvalError("E014", f"'{base_key}' has no transformer MLP of a layout WEMoE knows", span.get("base", call.span),
                        f"WEMoE upscales each layer's MLP, found as the Linear layers {known}")
    num_layers = arch.count_layers(h.config, h.tensors)
    probe = f"{next(iter(groups.values()))[0]}.weight"
    pctx = TensorCtx(probe, probe, arch.layer_of(probe), num_layers)
    experts = ev.eval(exprs["experts"], (), pctx)
    base = ev.eval(exprs["base"], (), pctx)
    arg_span = {"models": span.get("experts", call.span), "data": span.get("data", call.span)}
    models, datas = _models_and_data(call, {"models": experts, "data": o["data"]}, arg_span)
    keys = [_source_key(ev, call, m, arg_span["models"]) for m in models]
    _source_key(ev, call, base, span.get("base", call.span))
    src = ev.plan.sources[base_key]
    for d in datas:
        _check_data(ev, d)
        try:
            M.check_fits(src.path, d.spec, needs_logits=True)
        except DataError as err:
            raise EvalError(err.code, err.message, d.span_of(err.arg) if err.arg else call.span, err.hint) from None
    n = len(keys)
    depth = o["router_hidden_layers"]
    tensors = W.output_tensors(shapes, groups, n, depth)
    p = {k: o[k] for k in ("init_lambda", "router_hidden_layers", "lr", "steps", "batch_size", "seed")}
    p["batch_reduce"] = bool(o["batch_reduce"])
    p["groups"] = groups
    model_bytes = sum(4 * shape_numel(s) for s in shapes.values())
    tv_bytes = sum(4 * shape_numel(s) for _name, (kind, _m, s) in tensors.items() if kind in ("tv_weight", "tv_bias"))
    stage = {"kind": "wemoe", "model": base_key, "model_dir": src.path, "models": keys,
             "model_dirs": [ev.plan.sources[k].path for k in keys], "data": [d.spec for d in datas],
             "data_text": ", ".join(describe(d.spec) for d in datas), "params": p, "quiet": ["groups"],
             "estimate": {"examples": p["steps"] * n * p["batch_size"], "batches": p["steps"] * n,
                          "batch_size": p["batch_size"], "passes": "forward+backward", "models_resident": 1,
                          "peak_bytes": 2 * model_bytes + tv_bytes}}
    sk = f"wemoe[{base_key}]"
    while sk in ev.plan.sources:
        sk += "'"
    ev.plan.sources[sk] = SourceSpec(sk, "", {t: ("F32", s, "") for t, (kind, _m, s) in tensors.items()
                                              if kind == "router"}, {}, at(call.span), stage)
    ev.__dict__.setdefault("_wemoe", {})[id(call)] = (tensors, o, sk, h.tensors[probe].dtype)
    source_of = {}
    for name, (kind, mod, _s) in tensors.items():
        src_name = {"tv_weight": f"{mod}.weight", "tv_bias": f"{mod}.bias"}.get(kind, name)
        source_of[name] = (0, src_name, arch.layer_of(src_name), num_layers)
    cls = U.model_class(h.config)
    desc = U.description("wemoe", cls.__name__ if cls is not None else "AutoModel",
                         W.module_specs(groups, shapes, n, depth))
    return {"names": list(tensors), "reference": base_key, "num_layers": num_layers, "source_of": source_of,
            "description": desc, "note": _param_counts(tensors, n)}



def _param_counts(tensors: dict, n: int) -> str:
    """Stored parameters, and those of the model each input sample runs (its MLPs merged
    from the task vectors by its routing weights)."""
    from .moe_values import _human

    total = sum(shape_numel(s) for _k, _m, s in tensors.values())
    run = sum(shape_numel(s) for k, _m, s in tensors.values() if k not in ("tv_weight", "tv_bias"))
    return f"WEMoE, {n} experts: {_human(total)} parameters, {_human(run)} in the model each input runs"


def eval_wemoe(ev, call: ir.CallE, ctx: TensorCtx) -> TensorV:
    """Output tensor `ctx.group`'s value (see `arch.wemoe`)."""
    if id(call) not in ev.__dict__.get("_wemoe", {}):
        domain(ev, call)
    tensors, o, sk, dtype = ev._wemoe[id(call)]
    kind, _mod, shape = tensors[ctx.output or ctx.group]
    exprs = builtin_exprs(call)
    loc = ev._loc(call.span)
    if kind == "router":
        v = ev.load(sk, ctx, call.span)
        return TensorV(v.node, v.shape, dtype)  # written in the base's dtype
    base = ev.eval(exprs["base"], (), ctx)
    if kind in ("weight", "bias") or base.dtype not in FLOATS:
        return base
    experts = ev.eval(exprs["experts"], (), ctx)
    ev._same_shape([base, *experts], call.span, ctx, "wemoe()")
    tvs = [ev.plan.add("sub", (x.node, base.node), {}, group=ctx.group, loc=loc, shape=base.shape) for x in experts]
    if kind == "merged":  # task arithmetic, FusionBench's task_arithmetic_merge(base, experts, init_lambda)
        total = ev.plan.add("sum", tuple(tvs), {}, group=ctx.group, loc=loc, shape=base.shape)
        nid = ev.plan.add("axpy", (base.node, total), {"k": o["init_lambda"]}, group=ctx.group, loc=loc,
                          shape=base.shape)
        return TensorV(nid, base.shape, base.dtype)
    nid = ev.plan.add("stack_experts", tuple(tvs), {"parts": 1}, group=ctx.group, loc=loc, shape=shape)
    return TensorV(nid, shape, base.dtype)
