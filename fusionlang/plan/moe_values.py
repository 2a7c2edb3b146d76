"""`moe(base, experts, ...)`: a mixture of experts built from dense models, as the
evaluator sees it (mergekit-moe's `MoEMergeConfig`, in the language).

The merge's output tensors are not its inputs' (its domain, `arch.moe.output_tensors`):
every tensor of `base` but its MLPs; each layer's MLP becomes the experts' MLPs (each
expert is any model value: a source or a merge, evaluated at that MLP tensor's name) and a
router whose matrix comes from a model stage (`stages.routers`, kind "router": hidden
states of the base over each expert's prompts, or seeded random values). The arguments
are checked at compile time, located at the argument at fault: models that cannot form
the MoE (with the rule that failed), identical experts or identical prompts (refused
unless `allow_identical`), a top-k beyond the experts, a layout the installed
transformers cannot load; a number of experts that is not a power of two is a warning.
"""

from __future__ import annotations

from .. import arch, ir
from ..arch import moe as A
from ..lang.diagnostics import Diagnostic
from ..lang.signatures import BUILTINS
from .graph import SourceSpec, shape_numel
from .values import PROBE, EvalError, TensorCtx, TensorV, at

PARAMS = [name for name, _, _ in BUILTINS["moe"].params]
PROBE_CTX = TensorCtx(PROBE, PROBE, 0, 2)


def moe_call(ev, b: ir.Binding, builtin: str = "moe") -> ir.CallE | None:
    """The `moe(...)` (or other `builtin`) call that is the whole value of merge `b`
    (through references)."""
    v = b.value
    while isinstance(v, ir.Ref) and v.scope == "global" and v.name in ev.prog.bindings:
        v = ev.prog.bindings[v.name].value
    return v if isinstance(v, ir.CallE) and v.kind == "builtin" and v.target == builtin else None


def _exprs(call: ir.CallE) -> dict[str, ir.Expr]:
    return dict(zip(PARAMS, call.args)) | dict(call.kwargs)


def options(ev, call: ir.CallE) -> dict:
    """The call's non-model arguments, evaluated and checked (no model files needed);
    EvalError (E006) at the argument at fault."""
    exprs = _exprs(call)
    defaults = {name: default for name, _, default in BUILTINS["moe"].params}
    models = ("base", "experts", "shared_expert")
    o = {k: (ev.eval(exprs[k], (), PROBE_CTX) if k in exprs else defaults[k]) for k in PARAMS if k not in models}
    o["has_shared"] = "shared_expert" in exprs
    span = {k: e.span for k, e in exprs.items()}

    def bad(arg: str, message: str, hint: str):
        raise EvalError("E006", message, span.get(arg, call.span), hint)

    if o["gate_mode"] not in A.GATE_MODES:
        bad("gate_mode", f"gate_mode={o['gate_mode']!r} is not one of {', '.join(A.GATE_MODES)}",
            "hidden: the base's hidden states over each expert's prompts (mergekit-moe's default)")
    if o["architecture"] not in ("auto", *A.OUTPUTS):
        bad("architecture", f"architecture={o['architecture']!r} is not one of auto, {', '.join(A.OUTPUTS)}",
            "auto: qwen2_moe when there is a shared_expert, else mixtral")
    if o["architecture"] == "auto":
        o["architecture"] = "qwen2_moe" if o["has_shared"] else "mixtral"
    if o["architecture"] == "mixtral" and o["has_shared"]:
        bad("shared_expert", "a Mixtral MoE has no shared expert", 'leave architecture="auto" (a qwen2_moe MoE)')
    if o["architecture"] == "qwen2_moe" and not o["has_shared"]:
        bad("architecture", "a qwen2_moe MoE needs a shared_expert (a dense MLP every token also goes through)",
            "pass shared_expert=MODEL (e.g. the base), or architecture=\"mixtral\"")
    if o["layout"] not in ("auto", *A.LAYOUTS):
        bad("layout", f"layout={o['layout']!r} is not one of auto, {', '.join(A.LAYOUTS)}",
            "auto writes the per-expert layout when the installed transformers loads it")
    from ..stages.routers import DTYPES

    if o["router_dtype"] not in DTYPES:
        bad("router_dtype", f"router_dtype={o['router_dtype']!r} is not one of {', '.join(DTYPES)}",
            "mergekit-moe runs the base in bfloat16; float32 is more precise")
    k = o["experts_per_token"]
    if not isinstance(k, (int, float)) or isinstance(k, bool) or k != int(k) or k < 1:
        bad("experts_per_token", f"experts_per_token={k!r} must be a whole number of at least 1", "e.g. 2")
    o["experts_per_token"] = int(k)
    o["positive"] = _prompts(o.pop("positive_prompts"), "positive_prompts", span, call)
    o["negative"] = _prompts(o.pop("negative_prompts"), "negative_prompts", span, call)
    shared = o.pop("shared_prompts")
    o["shared"] = _prompts([shared] if shared is not None and all(isinstance(x, str) for x in shared) else shared,
                           "shared_prompts", span, call)
    if o["gate_mode"] not in ("random", "uniform_random") and o["positive"] is None:
        bad("gate_mode", f"gate_mode={o['gate_mode']!r} needs positive_prompts: one list of prompts per expert",
            'e.g. positive_prompts=[["solve", "equation"], ["def", "class"]], or gate_mode="random"')
    if o["gate_mode"] not in ("random", "uniform_random") and o["has_shared"] and o["shared"] is None:
        bad("shared_expert", f"gate_mode={o['gate_mode']!r} needs shared_prompts for the shared expert's gate",
            'e.g. shared_prompts=["hello", "tell me"]')
    for arg in ("noise_scale", "residual_scale"):
        v = o[arg]
        ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
            isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
        if not ok or (arg == "noise_scale" and any(x < 0 for x in (v if isinstance(v, list) else [v or 0]))):
            bad(arg, f"{arg} must be a number (every expert) or one number per expert"
                + (", at least 0" if arg == "noise_scale" else ""), f"e.g. {arg}=0.01 or {arg}=[0.01, 0.0]")
    o["spans"] = span
    return o


def _prompts(v, arg: str, span: dict, call: ir.CallE) -> list[list[str]] | None:
    """None, or one list of prompts per expert (a single string per expert is allowed)."""
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) or (isinstance(x, list) and x and all(
            isinstance(s, str) for s in x)) for x in v) or not v:
        raise EvalError("E006", f"{arg} must be one list of prompts (strings) per expert", span.get(arg, call.span),
                        f'e.g. {arg}=[["solve", "equation"], ["def", "class"]]')
    out = [[x] if isinstance(x, str) else list(x) for x in v]
    if any(not s.strip() for x in out for s in x):
        raise EvalError("E006", f"{arg} holds an empty prompt", span.get(arg, call.span), "every prompt needs some text")
    return out


def domain(ev, call: ir.CallE) -> dict:
    """The output tensors of a `moe(...)` merge (the fields of a `domains.Domain`:
    names, reference, num_layers, source_of, config_overrides, note), registering the
    router stage. EvalError for experts that cannot form the MoE."""
    o = options(ev, call)
    exprs, span = _exprs(call), o["spans"]
    base_call = ev.first_source(exprs["base"])
    if base_call is None:
        raise EvalError("E005", "moe() needs a base model", call.span, "write moe(base, experts, ...)")
    base_key = ev.source(base_call, ev.call_args(base_call, (), PROBE_CTX))
    h = ev.headers[base_key]
    reason = A.incompatibility(o["architecture"], {base_key: h.config})
    if reason:
        raise EvalError("E014", f"these models cannot form a {o['architecture']} MoE: {reason}", call.span,
                        _arch_hint(h.config))
    layers = A.mlp_layers(h.tensors)
    if not layers:
        raise EvalError("E014", f"'{base_key}' has no dense MLP (mlp.gate_proj / up_proj / down_proj) to make experts of",
                        span.get("base", call.span), "a MoE is built from Llama, Mistral or Qwen2 models")
    probe = next(n for n in h.tensors if A.MLP_RE.match(n) and n.endswith("gate_proj.weight"))
    experts = ev.eval(exprs["experts"], (), TensorCtx(probe, probe, layers[0], len(layers)))
    if not isinstance(experts, list) or not experts or not all(isinstance(x, TensorV) for x in experts):
        raise EvalError("E005", "experts must be a non-empty list of models", span.get("experts", call.span),
                        "pass a `models` list or [a, b, ...]")
    n = len(experts)
    configs = {base_key: h.config}
    shared = None
    if o["has_shared"]:
        shared = ev.eval(exprs["shared_expert"], (), TensorCtx(probe, probe, layers[0], len(layers)))
        if not isinstance(shared, TensorV):
            raise EvalError("E005", "shared_expert must be a model", span["shared_expert"], "pass one model")
    for x in experts + ([shared] if shared is not None else []):
        for key in _sources_of(ev, x.node):
            configs.setdefault(key, ev.headers[key].config if key in ev.headers else {})
    reason = A.incompatibility(o["architecture"], configs)
    if reason:
        raise EvalError("E014", f"these models cannot form a {o['architecture']} MoE: {reason}", call.span,
                        _arch_hint(h.config))
    if o["experts_per_token"] > n:
        raise EvalError("E006", f"experts_per_token={o['experts_per_token']} but there are {n} experts",
                        span.get("experts_per_token", call.span), f"route each token to at most {n} experts")
    sigs = [ev.signature(x.node) for x in experts]
    same = [(i, j) for i in range(n) for j in range(i + 1, n) if sigs[i] == sigs[j]]
    if not same and not o["allow_identical"]:
        same = _same_content(ev, experts)
    if same and not o["allow_identical"]:
        i, j, how = (*same[0], "")[:3]
        raise EvalError("E006", f"experts {i} and {j} are the same model{how}: the MoE would be bigger and slower and "
                        "compute nothing new", span.get("experts", call.span),
                        "pass allow_identical=true to upcycle a model into identical experts (e.g. to train them later)")
    for arg in ("noise_scale", "residual_scale"):
        if isinstance(o[arg], list) and len(o[arg]) != n:
            raise EvalError("E006", f"{arg} has {len(o[arg])} values for {n} experts", span.get(arg, call.span),
                            "give one number (every expert) or one per expert")
    for arg in ("positive", "negative"):
        if o[arg] is not None and len(o[arg]) != n:
            raise EvalError("E006", f"{arg}_prompts has {len(o[arg])} entries for {n} experts",
                            span.get(f"{arg}_prompts", call.span), "give one list of prompts per expert")
    if o["gate_mode"] not in ("random", "uniform_random"):
        neg = o["negative"] or [[] for _ in range(n)]
        keys = [(tuple(p), tuple(q)) for p, q in zip(o["positive"], neg)]
        dup = [(i, j) for i in range(n) for j in range(i + 1, n) if keys[i] == keys[j]]
        if dup and not o["allow_identical"]:
            i, j = dup[0]
            raise EvalError("E006", f"experts {i} and {j} have the same prompts, so their router rows are identical "
                            "and no token can prefer one of them", span.get("positive_prompts", call.span),
                            "give each expert prompts of its own domain (or allow_identical=true)")
    if n & (n - 1):
        ev._report(Diagnostic("W003", f"{n} experts is not a power of two: llama.cpp cannot run this MoE",
                              span.get("experts", call.span), "use 2, 4 or 8 experts for llama.cpp", "warning"))
    installed = A.installed_layouts(o["architecture"])
    layout = o["layout"]
    if layout == "auto":
        layout = "per_expert" if "per_expert" in installed else "fused"
    elif layout not in installed:
        raise EvalError("E014", f"the installed transformers does not load the {layout} layout of "
                        f"{o['architecture']} (it loads: {', '.join(installed) or 'neither'})",
                        span.get("layout", call.span), "leave layout=\"auto\"")
    tensors = A.output_tensors({k: t.shape for k, t in h.tensors.items()}, n, layout, o["architecture"])
    num_layers = max(layers) + 1
    router = _register_router(ev, call, base_key, o, n, num_layers)
    ev.__dict__.setdefault("_moe", {})[id(call)] = (tensors, router, o)
    dtype = h.tensors[probe].dtype
    ev.__dict__.setdefault("_moe_dtype", {})[id(call)] = dtype
    source_of = {}
    for name, t in tensors.items():
        layer = t.layer if t.kind == "router" else arch.layer_of(t.source or (t.sources[0] if t.sources else name))
        source_of[name] = (0, name, layer, num_layers)
    overrides = A.output_config(h.config, o["architecture"], n, o["experts_per_token"])
    return {"names": list(tensors), "reference": base_key, "num_layers": num_layers, "source_of": source_of,
            "config_overrides": overrides, "note": _param_counts(h, tensors, n, o["experts_per_token"])}


def _same_content(ev, experts: list) -> list[tuple[int, int, str]]:
    """Pairs (i, j, why) of experts read from different directories whose MLP tensors
    hold the same bytes (a copied directory): each expert of the MoE is its MLPs, so
    such experts are the same expert. Experts that are merges are not compared."""
    from ..runtime.sources import same_tensor_bytes

    srcs = [ev.plan.nodes[x.node].param("source") if ev.plan.nodes[x.node].op == "load" else None
            for x in experts]
    out = []
    for i in range(len(experts)):
        for j in range(i + 1, len(experts)):
            if srcs[i] is None or srcs[j] is None or srcs[i] == srcs[j]:
                continue
            ti, tj = ev.headers[srcs[i]].tensors, ev.headers[srcs[j]].tensors
            names = [k for k in ti if A.MLP_RE.match(k) and k in tj]
            try:
                if names and same_tensor_bytes([(ti[k], k, tj[k], k) for k in names]):
                    why = (f" (their MLP weights are equal byte for byte: '{ev.headers[srcs[i]].path}' and "
                           f"'{ev.headers[srcs[j]].path}')")
                    out.append((i, j, why))
            except (OSError, KeyError, ValueError):
                continue  # an unreadable file is reported where the run reads it
    return out


def _sources_of(ev, nid: str) -> set[str]:
    out, stack, seen = set(), [nid], set()
    while stack:
        k = stack.pop()
        if k in seen or k not in ev.plan.nodes:
            continue
        seen.add(k)
        node = ev.plan.nodes[k]
        if node.op == "load":
            out.add(node.param("source"))
        stack.extend(node.inputs)
    return out


def _register_router(ev, call: ir.CallE, base_key: str, o: dict, n: int, layers: int) -> str:
    src = ev.plan.sources[base_key]
    hidden = int(src.config.get("hidden_size") or 0)
    embed = next((t for t in src.tensors if t.endswith("embed_tokens.weight")), "")
    positive = o["positive"] or [[] for _ in range(n)]
    negative = o["negative"] or [[] for _ in range(n)]
    if o["has_shared"]:  # the shared expert's gate: one more row, computed like the experts'
        positive, negative = positive + [(o["shared"] or [[]])[0]], negative + [[]]
    params = {"mode": o["gate_mode"], "positive": positive, "negative": negative, "num_layers": layers,
              "hidden_size": hidden, "dtype": o["router_dtype"], "seed": int(o["seed"]), "embed": embed,
              "shared": bool(o["has_shared"])}
    prompts = sum(len(p) + len(q) for p, q in zip(params["positive"], params["negative"]))
    forward = o["gate_mode"] in ("hidden", "hidden_avg")
    random = o["gate_mode"] in ("random", "uniform_random")
    model_bytes = sum(4 * shape_numel(s) for _, s, _ in src.tensors.values())
    passes = n + sum(1 for q in params["negative"] if q)
    estimate = {"examples": prompts, "batches": passes if forward else 0, "batch_size": 0,
                "passes": "forward" if forward else "no", "models_resident": 1 if forward else 0,
                "peak_bytes": model_bytes if forward else 0}
    stage = {"kind": "router", "model": base_key, "model_dir": src.path, "data": [],
             "data_text": f"{n} experts' prompts" if prompts else f"{o['gate_mode']}, seed={o['seed']}",
             "params": params, "estimate": estimate,
             "quiet": ["positive", "negative", "num_layers", "hidden_size", "embed", "shared"],  # not shown by `compile`
             "reads_weights": not random}  # a seeded random router does not depend on the weights
    sk = f"router[{base_key}]"
    while sk in ev.plan.sources:
        sk += "'"
    tensors = {f"router.{i}": ("F32", (n, hidden), "") for i in range(layers)}
    if o["has_shared"]:
        tensors.update({f"shared_router.{i}": ("F32", (1, hidden), "") for i in range(layers)})
    ev.plan.sources[sk] = SourceSpec(sk, "", tensors, {}, at(call.span), stage)
    return sk


def _arch_hint(config: dict) -> str:
    if config.get("model_type") == "qwen2":
        return "a Qwen2 base becomes a qwen2_moe MoE: pass shared_expert=MODEL (mergekit-moe's shared_experts)"
    return "build a MoE from a base and experts of one Llama, Mistral or Qwen2 architecture and size"



def _param_counts(h, tensors: dict, n: int, top_k: int) -> str:
    """'total N parameters, M active per token': the experts count once each in the total
    and top_k times in the active count."""
    total = active = 0
    for name, t in tensors.items():
        if t.kind == "base":
            k = shape_numel(h.tensors[name].shape)
            total, active = total + k, active + k
        elif t.kind in ("router", "shared_router"):
            k = (n if t.kind == "router" else 1) * int(h.config.get("hidden_size") or 0)
            total, active = total + k, active + k
        elif t.kind in ("shared", "zeros"):
            k = shape_numel(h.tensors[t.source].shape) if t.kind == "shared" else shape_numel(t.shape)
            total, active = total + k, active + k
        elif t.kind == "expert":
            k = shape_numel(h.tensors[t.source].shape)
            total, active = total + k, active + (k * top_k) // n
        else:
            k = sum(shape_numel(h.tensors[s].shape) for s in t.sources)
            total, active = total + n * k, active + top_k * k
    return f"{n} experts, top-{top_k}: {_human(total)} parameters, {_human(active)} active per token"


def _human(k: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if k >= div:
            return f"{k / div:.2f}{unit}"
    return str(k)


def eval_moe(ev, call: ir.CallE, ctx: TensorCtx) -> TensorV:
    """Output tensor `ctx.group` of the MoE (see `arch.moe.ExpertTensor`)."""
    if id(call) not in ev.__dict__.get("_moe", {}):
        domain(ev, call)
    tensors, router, o = ev._moe[id(call)]
    t = tensors[ctx.group]
    exprs = _exprs(call)
    loc = ev._loc(call.span)
    if t.kind == "base":
        return ev.eval(exprs["base"], (), TensorCtx(t.source, ctx.group, ctx.layer, ctx.num_layers))
    if t.kind in ("router", "shared_router"):
        v = ev.load(router, TensorCtx(f"{t.kind}.{t.layer}", ctx.group, ctx.layer, ctx.num_layers), call.span)
        return TensorV(v.node, v.shape, ev._moe_dtype[id(call)])  # written in the base's dtype
    if t.kind == "shared":
        return ev.eval(exprs["shared_expert"], (), TensorCtx(t.source, ctx.group, ctx.layer, ctx.num_layers))
    if t.kind == "zeros":
        nid = ev.plan.add("zeros", (), {"shape": [float(d) for d in t.shape]}, group=ctx.group, loc=loc, shape=t.shape)
        return TensorV(nid, t.shape, ev._moe_dtype[id(call)])
    parts = []
    for j in t.experts:
        for s in (t.sources or (t.source,)):
            x = ev.eval(exprs["experts"], (), TensorCtx(s, ctx.group, ctx.layer, ctx.num_layers))[j]
            parts.append(_noise_and_scale(ev, x, j, s, t.residual, o, ctx, loc))
    if t.kind == "expert":
        return parts[0]
    rows = sum(p.shape[0] for p in parts[:len(t.sources)])
    shape = (len(t.experts), rows, parts[0].shape[1])
    nid = ev.plan.add("stack_experts", tuple(p.node for p in parts), {"parts": len(t.sources)}, group=ctx.group,
                      loc=loc, shape=shape)
    return TensorV(nid, shape, parts[0].dtype)


def _per_expert(v, j: int):
    return v[j] if isinstance(v, list) else v


def _noise_and_scale(ev, x: TensorV, j: int, source: str, residual: bool, o: dict, ctx: TensorCtx, loc: str) -> TensorV:
    """mergekit-moe's per-expert noise_scale (Gaussian noise, seeded per tensor here) and
    residual_scale (multiplies the down projection)."""
    from ..ops.sparsify import tensor_seed

    noise = _per_expert(o["noise_scale"], j)
    if noise:
        seed = tensor_seed(int(o["seed"]), ctx.group, source, str(j))
        x = TensorV(ev.plan.add("gaussian_noise", (x.node,), {"scale": float(noise), "seed": seed}, group=ctx.group,
                                loc=loc, shape=x.shape), x.shape, x.dtype)
    scale = _per_expert(o["residual_scale"], j)
    if residual and scale is not None and float(scale) != 1.0:
        x = TensorV(ev.plan.add("scale", (x.node,), {"k": float(scale)}, group=ctx.group, loc=loc, shape=x.shape),
                    x.shape, x.dtype)
    return x
