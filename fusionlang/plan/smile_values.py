"""`smile(base, experts, ...)`: SMILE upscaling (a sparse mixture of low-rank experts
from fine-tuned models, data-free), as the evaluator sees it.

The output has every tensor of `base` (or, with `average_experts`, the experts' mean for
tensors that are not in an upscaled Linear) and, for each Linear layer the base's class
has (`arch.upscaled.linear_modules`, FusionBench's `isinstance(m, nn.Linear)`, narrowed
by `linears=` patterns), the SMILE tensors of `arch.smile`. The three factor tensors of
one layer are computed in one tensor group, so each expert's task vector is decomposed
once. The output is written with a description (`arch.upscaled`) that
`fusionlang.load(dir)` and `eval` rebuild it from.
"""

from __future__ import annotations

import json
import re

from .. import arch, ir
from ..arch import smile as S
from ..arch import upscaled as U
from ..lang.signatures import pattern_regex
from ..ops.svd import smile_sizes
from .values import PROBE, EvalError, TensorCtx, TensorV, builtin_exprs, builtin_options

PROBE_CTX = TensorCtx(PROBE, PROBE, 0, 2)



def options(ev, call: ir.CallE) -> dict:
    """The call's non-model arguments, evaluated and checked; EvalError (E006) at the
    argument at fault."""
    o = builtin_options(ev, call, ("base", "experts"))
    span = o["spans"]
    for arg, least in (("k", None), ("gate_k", 1), ("top_k", 1)):
        v = o[arg]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != int(v) or (least and v < least):
            raise EvalError("E006", f"{arg}={v!r} must be a whole number" + (f" of at least {least}" if least else ""),
                            span.get(arg, call.span),
                            "k: the rank of each expert (k ≤ 0: the whole task vector); gate_k: router rows per "
                            "expert; top_k: experts per token")
        o[arg] = int(v)
    pats = o["linears"]
    if pats is not None and (not isinstance(pats, list) or not pats or not all(isinstance(p, str) and p for p in pats)):
        raise EvalError("E006", "linears must be a list of tensor-name patterns", span.get("linears", call.span),
                        'e.g. linears=["*.mlp.*", "*.intermediate.dense", "*.output.dense"]')
    return o


def domain(ev, call: ir.CallE) -> dict:
    """The output tensors of a `smile(...)` merge (the fields of a `domains.Domain`),
    with the description written next to the weights. EvalError for a base with no
    Linear layer, patterns that select none, experts that are not models, a top_k
    beyond the experts."""
    o = options(ev, call)
    exprs, span = builtin_exprs(call), o["spans"]
    base_call = ev.first_source(exprs["base"])
    if base_call is None:
        raise EvalError("E005", "smile() needs a base model", call.span, "write smile(base, experts, ...)")
    base_key = ev.source(base_call, ev.call_args(base_call, (), PROBE_CTX))
    h = ev.headers[base_key]
    shapes = {k: tuple(t.shape) for k, t in h.tensors.items()}
    linears = linears_of(base_key, h, span.get("base", call.span), "SMILE")
    if o["linears"] is not None:
        regexes = [re.compile(pattern_regex(p)[0]) for p in o["linears"]]
        chosen = [m for m in linears if any(r.match(m) or r.match(f"{m}.weight") for r in regexes)]
        if not chosen:
            raise EvalError("E008", f"linears={o['linears']} matches none of the {len(linears)} Linear layers of "
                            f"'{base_key}'", span.get("linears", call.span),
                            f"e.g. {', '.join(linears[:3])}" if linears else "this model has no Linear layer")
        linears = chosen
    if not linears:
        raise EvalError("E014", f"'{base_key}' has no Linear layer to upscale (SMILE replaces torch.nn.Linear layers)",
                        span.get("base", call.span), "SMILE needs a model with Linear layers (transformers, MLPs)")
    probe = f"{linears[0]}.weight"
    experts = ev.eval(exprs["experts"], (), TensorCtx(probe, probe, arch.layer_of(probe), arch.count_layers(h.config, h.tensors)))
    if not isinstance(experts, list) or not experts or not all(isinstance(x, TensorV) for x in experts):
        raise EvalError("E005", "experts must be a non-empty list of models", span.get("experts", call.span),
                        "pass a `models` list or [a, b, ...]")
    n = len(experts)
    if o["top_k"] > n:
        raise EvalError("E006", f"top_k={o['top_k']} but there are {n} experts", span.get("top_k", call.span),
                        f"route each token to at most {n} experts")
    tensors = S.output_tensors(shapes, linears, n, o["k"], o["gate_k"])
    ev.__dict__.setdefault("_smile", {})[id(call)] = (tensors, o, h.tensors[probe].dtype)
    num_layers = arch.count_layers(h.config, h.tensors)
    source_of, group_of = {}, {}
    for name, (kind, mod, _shape) in tensors.items():
        src = name if kind in ("base", "weight", "bias") else f"{mod}.weight"
        source_of[name] = (0, src, arch.layer_of(src), num_layers)
        if kind in S.SUFFIXES[:3]:
            group_of[name] = f"{mod}.smile"  # one unit: each expert's SVD once for gate, u, svh
    cls = U.model_class(h.config)
    desc = U.description("smile", cls.__name__ if cls is not None else "AutoModel", S.module_specs(tensors, n, o["top_k"]))
    return {"names": list(tensors), "reference": base_key, "num_layers": num_layers, "source_of": source_of,
            "group_of": group_of, "description": desc, "note": _param_counts(tensors, n, o["top_k"])}


def linears_of(key: str, h, span, method: str) -> list[str]:
    """The Linear layers of model `key` (header `h`) by their names in its files;
    EvalError (E014) when transformers cannot build the model from its config."""
    try:
        modules = U.linear_modules(json.dumps(h.config, sort_keys=True))
    except ValueError as e:
        raise EvalError("E014", f"cannot list the Linear layers of '{key}': {e}", span,
                        f"{method} upscales a transformers model whose config.json names its architecture") from None
    return U.checkpoint_linears(modules, {k: tuple(t.shape) for k, t in h.tensors.items()})


def _param_counts(tensors: dict, n: int, top_k: int) -> str:
    """'total N parameters, M active per token': each expert's factors count once in the
    total and top_k of n times in the active count (the gates always)."""
    total = active = 0
    for kind, _mod, shape in tensors.values():
        k = 1
        for d in shape:
            k *= int(d)
        total += k
        active += k * top_k // n if kind in ("smile_u", "smile_svh", "smile_bias") else k
    from .moe_values import _human

    return f"SMILE, {n} experts, top-{top_k}: {_human(total)} parameters, {_human(active)} active per token"


def eval_smile(ev, call: ir.CallE, ctx: TensorCtx) -> TensorV:
    """Output tensor `ctx.group`'s value (see `arch.smile`)."""
    if id(call) not in ev.__dict__.get("_smile", {}):
        domain(ev, call)
    tensors, o, dtype = ev._smile[id(call)]
    kind, mod, shape = tensors[ctx.output or ctx.group]
    exprs = builtin_exprs(call)
    loc = ev._loc(call.span)
    if kind in ("weight", "bias") or (kind == "base" and not o["average_experts"]):
        return ev.eval(exprs["base"], (), ctx)
    if kind == "base":
        xs = ev.eval(exprs["experts"], (), ctx)
        if xs and xs[0].dtype not in ("F32", "F16", "BF16", "F64"):
            return ev.eval(exprs["base"], (), ctx)  # integer buffers are not averaged
        ev._same_shape(xs, call.span, ctx, "smile() average_experts")
        nid = ev.plan.add("mean", tuple(x.node for x in xs), {}, group=ctx.group, loc=loc, shape=xs[0].shape)
        return TensorV(nid, xs[0].shape, xs[0].dtype)
    base = ev.eval(exprs["base"], (), ctx)
    experts = ev.eval(exprs["experts"], (), ctx)
    ev._same_shape([base, *experts], call.span, ctx, "smile()")
    parts = []
    if kind == "smile_bias":
        bctx = TensorCtx(f"{mod}.bias", ctx.group, ctx.layer, ctx.num_layers)
        b0, bs = ev.eval(exprs["base"], (), bctx), ev.eval(exprs["experts"], (), bctx)
        ev._same_shape([b0, *bs], call.span, bctx, "smile()")
        parts = [ev.plan.add("sub", (b.node, b0.node), {}, group=ctx.group, loc=loc, shape=b0.shape) for b in bs]
    else:
        out_f, in_f = base.shape
        k, gk = smile_sizes(out_f, in_f, o["k"], o["gate_k"])
        sizes = {"smile_u": (0, (out_f, k)), "smile_svh": (out_f * k, (k, in_f)),
                 "smile_gate": (out_f * k + k * in_f, (gk, in_f))}
        offset, piece = sizes[kind]
        total = out_f * k + k * in_f + gk * in_f
        for x in experts:
            packed = ev.plan.add("smile_factors", (base.node, x.node),
                                 {"k": k, "gate_k": gk, "routing_use_diff": bool(o["routing_use_diff"])},
                                 group=ctx.group, loc=loc, shape=(total,))
            parts.append(ev.plan.add("unpack", (packed,), {"offset": offset, "shape": [float(d) for d in piece]},
                                     group=ctx.group, loc=loc, shape=piece))
    nid = ev.plan.add("stack_experts", tuple(parts), {"parts": 1}, group=ctx.group, loc=loc, shape=shape)
    return TensorV(nid, shape, dtype)
