"""LoRA adapters as inputs: `lora(base, "dir")` (an adapter merged into its base, tensor
by tensor: MergeKit's model+lora, PEFT's merge_and_unload) and
`merge_adapters([...], weights, combination_type)` (adapters merged in adapter space:
PEFT's add_weighted_adapter), as the evaluator sees them.

An adapter directory becomes a plan source (`lora:NAME`) whose tensors are the factors
in adapter_model.safetensors and whose config is its adapter_config.json.
"""

from __future__ import annotations

import re

from .. import ir
from ..arch import lora as L
from .values import EvalError, TensorCtx, TensorV, builtin_options


def adapter_source(ev, call: ir.CallE, path: str, span=None) -> str:
    """The plan source key of an adapter directory (read once per spec); EvalError at
    `span` (default: the call's path argument) when it cannot be read or applied."""
    from ..lang.values import spec_path
    from ..runtime.sources import SourceError, read_adapter_dir
    from .graph import SourceSpec
    from .values import at

    full = spec_path(call.span.file, path)
    seen = ev.__dict__.setdefault("_adapters", {})
    if full in seen:
        return seen[full]
    if span is None:
        arg = dict(zip(("base", "path"), call.args)) | dict(call.kwargs)
        span = arg["path"].span if "path" in arg else call.span
    try:
        config, tensors = read_adapter_dir(full)
    except SourceError as e:
        raise EvalError(e.code, e.message, span, e.hint) from None
    key = "lora:" + (full.rstrip("/").rsplit("/", 1)[-1] or "adapter")
    while key in ev.plan.sources:
        key += "'"
    ev.plan.sources[key] = SourceSpec(key, full, {n: (t.dtype, t.shape, t.file) for n, t in tensors.items()}, config,
                                      at=at(span))
    ev.sources_used[key] = span
    seen[full] = key
    return key


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that is the module's
    name or a suffix of it after a dot (`re.match(rf"(.*\\.)?{key}$", module)`)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def adapter_modules(ev, key: str) -> dict[str, set[str]]:
    """The modules of adapter source `key` (names in the model class, without PEFT's
    `base_model.model.` prefix) -> their tensor names in the adapter file."""
    memo = ev.__dict__.setdefault("_adapter_modules", {})
    if key not in memo:
        names: dict[str, set[str]] = {}
        for t in ev.plan.sources[key].tensors:
            if t.startswith(L.PREFIX):
                rest = t[len(L.PREFIX):]
                mod = rest.split(".lora_", 1)[0] if ".lora_" in rest else rest.rpartition(".")[0]
                names.setdefault(mod.removesuffix(".base_layer"), set()).add(t)
        memo[key] = names
    return memo[key]


def scaling(cfg: dict, module: str) -> float:
    """PEFT's LoRA scaling of a module: lora_alpha / r (/ √r with use_rslora), r and alpha
    from rank_pattern / alpha_pattern when they name the module."""
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
    return alpha / (r ** 0.5 if cfg.get("use_rslora") else r)


def _adapter_module(names: dict, module: str) -> str | None:
    """The adapter's name for a checkpoint module: the same, or the one that ends with
    it after a dot (a class that prefixes its checkpoint's names, e.g. `bert.`)."""
    if module in names:
        return module
    hits = [n for n in names if n.endswith("." + module)]
    return hits[0] if len(hits) == 1 else None


def apply_lora(ev, call: ir.CallE, args: dict, ctx: TensorCtx):
    """`lora(base, path, scale)` at tensor `ctx.tensor`: the base tensor with the adapter's
    update merged in (PEFT's merge_and_unload), the adapter's own tensor for a module it
    saves whole (`modules_to_save`), else the base tensor unchanged."""
    base = args["base"]
    if ev.dry or not isinstance(base, TensorV):
        return base
    key = adapter_source(ev, call, str(args["path"]))
    src = ev.plan.sources[key]
    prefix = L.PREFIX
    module, _, leaf = ctx.tensor.rpartition(".")
    am = _adapter_module(adapter_modules(ev, key), module)
    if am is None:
        return base
    loc = ev._loc(call.span)
    full = f"{prefix}{am}.{leaf}"
    if full in src.tensors:  # modules_to_save: the adapter's tensor replaces the base's
        return _checked(ev, ev.load(key, TensorCtx(full, ctx.group, ctx.layer, ctx.num_layers), call.span), base,
                        call, key, full)
    layer = f"{prefix}{am}.base_layer.{leaf}"
    if layer in src.tensors:  # PEFT saved the targeted embedding layer itself (save_embedding_layers)
        base = _checked(ev, ev.load(key, TensorCtx(layer, ctx.group, ctx.layer, ctx.num_layers), call.span), base,
                        call, key, layer)
    cfg = src.config
    scale = float(args.get("scale", 1.0)) * scaling(cfg, am)

    def sub(t: str) -> TensorCtx:
        return TensorCtx(t, ctx.group, ctx.layer, ctx.num_layers)

    if leaf == "bias" and cfg.get("lora_bias") and f"{prefix}{am}.lora_B.bias" in src.tensors:
        bias = ev.load(key, sub(f"{prefix}{am}.lora_B.bias"), call.span)
        _checked(ev, bias, base, call, key, f"{prefix}{am}.lora_B.bias")
        nid = ev.plan.add("axpy", (base.node, bias.node), {"k": scale}, group=ctx.group, loc=loc, shape=base.shape)
        return TensorV(nid, base.shape, base.dtype)
    if leaf != "weight":
        return base
    for a_name, b_name, transpose in ((f"{prefix}{am}.lora_A.weight", f"{prefix}{am}.lora_B.weight",
                                       bool(cfg.get("fan_in_fan_out"))),
                                      (f"{prefix}{am}.lora_embedding_A", f"{prefix}{am}.lora_embedding_B", True)):
        if a_name in src.tensors and b_name in src.tensors:
            a, b = ev.load(key, sub(a_name), call.span), ev.load(key, sub(b_name), call.span)
            out_f, in_f = (base.shape[1], base.shape[0]) if transpose else (base.shape[0], base.shape[1])
            if len(base.shape) != 2 or tuple(a.shape) != (a.shape[0], in_f) or tuple(b.shape) != (out_f, a.shape[0]):
                raise EvalError("E009", f"the adapter's {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} do "
                                f"not fit tensor '{ctx.tensor}' {tuple(base.shape)} of the base", call.span,
                                "apply the adapter to the model it was trained on")
            nid = ev.plan.add("lora_apply", (base.node, a.node, b.node), {"scale": scale, "transpose": transpose},
                              group=ctx.group, loc=loc, shape=base.shape)
            return TensorV(nid, base.shape, base.dtype)
    return base


def _checked(ev, v: TensorV, base: TensorV, call: ir.CallE, key: str, name: str) -> TensorV:
    if tuple(v.shape) != tuple(base.shape):
        raise EvalError("E009", f"the adapter's {name} is {tuple(v.shape)} but the base's tensor is "
                        f"{tuple(base.shape)}", call.span, "apply the adapter to the model it was trained on "
                        "(a vocabulary grown by the fine-tune needs that model's embeddings)")
    return v


# -- merge_adapters([...], weights, combination_type): PEFT's add_weighted_adapter ---------

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
TYPES = LINEAR_FAMILY + ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def merge_domain(ev, call: ir.CallE) -> dict:
    """The output tensors of `merge_adapters(...)` (the fields of a `domains.Domain`): per
    module any adapter targets, the new A and B (rank: PEFT's — the adapters' common r
    for the linear family, their sum for cat, svd_rank or their largest for the SVD
    family) and the adapter_config.json PEFT would write. EvalError (located) for bad
    arguments, adapters that save modules whole or carry LoRA biases, mixed ranks in
    the linear family."""
    o = builtin_options(ev, call, ())
    span = o["spans"]
    paths = o["adapters"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise EvalError("E006", "adapters must be a non-empty list of adapter directories", span.get("adapters", call.span),
                        'e.g. merge_adapters(["adapters/chat", "adapters/code"], weights=[0.5, 0.5])')
    weights = o["weights"]
    if not isinstance(weights, list) or len(weights) != len(paths):
        raise EvalError("E006", f"weights must give one number per adapter ({len(paths)})",
                        span.get("weights", call.span), "e.g. weights=[0.5, 0.5]")
    ctype = o["combination_type"] if len(paths) > 1 else "linear"  # PEFT: one adapter merges linearly
    if ctype not in TYPES:
        raise EvalError("E006", f"combination_type={o['combination_type']!r} is not one of {', '.join(TYPES)}",
                        span.get("combination_type", call.span), 'e.g. combination_type="svd"')
    density = 1.0 if o["density"] is None else float(o["density"])
    if not 0 <= density <= 1:
        raise EvalError("E006", f"density={density!r} must be in [0, 1]", span.get("density", call.span),
                        "the fraction of entries each adapter keeps before ties / dare / magnitude_prune")
    at = span.get("adapters", call.span)
    keys = [adapter_source(ev, call, p, at) for p in paths]
    ranks = []
    for key, p in zip(keys, paths, strict=True):
        cfg = ev.plan.sources[key].config
        whole = [m for m, ts in adapter_modules(ev, key).items()
                 if any(".lora_" not in t and ".base_layer." not in t for t in ts)]
        if whole or cfg.get("lora_bias"):
            what = f"saves {whole[0]} whole (modules_to_save)" if whole else "carries LoRA biases (lora_bias)"
            raise EvalError("E014", f"adapter '{p}' {what}: adapter-space merging combines LoRA factors only",
                            at, "merge such adapters into their models with lora(base, dir) and merge those")
        ranks.append(max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())]))
    if ctype in LINEAR_FAMILY and len(set(ranks)) != 1:
        raise EvalError("E006", f"combination_type={ctype!r} adds the factors of adapters of one rank, and these have "
                        f"r = {', '.join(map(str, ranks))}", span.get("combination_type", call.span),
                        'use combination_type="cat" (ranks add up) or "svd" (factored again)')
    new_rank = ranks[0] if ctype in LINEAR_FAMILY else sum(ranks) if ctype == "cat" else \
        int(o["svd_rank"] or max(ranks))
    modules: dict[str, tuple] = {}  # module -> (embedding, out, in)
    for key in keys:
        src = ev.plan.sources[key]
        for m, ts in adapter_modules(ev, key).items():
            emb = f"{L.PREFIX}{m}.lora_embedding_A" in ts
            a, b = (f"{L.PREFIX}{m}.lora_embedding_{x}" if emb else f"{L.PREFIX}{m}.lora_{x}.weight" for x in "AB")
            if a in src.tensors and b in src.tensors:
                shape = (emb, src.tensors[b][1][0], src.tensors[a][1][1])
                if modules.setdefault(m, shape) != shape:
                    raise EvalError("E009", f"the adapters' factors of {m} have different shapes", at,
                                    "merge adapters of one base model")
    tensors = {}
    for m, (emb, out_f, in_f) in modules.items():
        stem, suffix = ("lora_embedding_", "") if emb else ("lora_", ".weight")
        tensors[f"{L.PREFIX}{m}.{stem}A{suffix}"] = ("A", m, (new_rank, in_f))
        tensors[f"{L.PREFIX}{m}.{stem}B{suffix}"] = ("B", m, (out_f, new_rank))
    first = ev.plan.sources[keys[0]].config
    config = {**first, "r": new_rank, "lora_alpha": new_rank, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": sorted({m.split(".")[-1] for m in modules}), "use_rslora": False}
    ev.__dict__.setdefault("_adapter_merge", {})[id(call)] = (tensors, o | {"combination_type": ctype,
                                                                         "density": density}, keys)
    return {"names": list(tensors), "reference": keys[0], "num_layers": 0,
            "source_of": {n: (0, n, None, 0) for n in tensors},
            "group_of": {n: f"{m}.adapters" for n, (_, m, _) in tensors.items()},
            "description": {"format": L.ADAPTER_FORMAT, "adapter_config": config},
            "note": f"PEFT LoRA adapter: {len(paths)} adapters merged ({ctype}), {len(modules)} modules, r = {new_rank}"}


def eval_merge(ev, call: ir.CallE, ctx: TensorCtx) -> TensorV:
    """Output tensor `ctx.output` of `merge_adapters(...)` (see `ops.adapters`)."""
    from ..ops.sparsify import tensor_seed

    if id(call) not in ev.__dict__.get("_adapter_merge", {}):
        merge_domain(ev, call)
    tensors, o, keys = ev._adapter_merge[id(call)]
    part, module, shape = tensors[ctx.output or ctx.group]
    loc = ev._loc(call.span)
    ctype = o["combination_type"]
    emb = ".lora_embedding_" in (ctx.output or "")
    a_name, b_name = (f"{L.PREFIX}{module}.lora_embedding_{x}" if emb else f"{L.PREFIX}{module}.lora_{x}.weight"
                      for x in "AB")
    factors, ws, scales = [], [], []
    for key, w in zip(keys, o["weights"], strict=True):
        src = ev.plan.sources[key]
        if a_name not in src.tensors or b_name not in src.tensors:
            continue  # this adapter does not target the module
        factors.append(tuple(ev.load(key, TensorCtx(n, ctx.group, 0, 0), call.span) for n in (a_name, b_name)))
        ws.append(float(w))
        scales.append(scaling(src.config, module))
    seed = tensor_seed(int(o["seed"]), module, part)
    method = ctype.removesuffix("_svd") if ctype != "svd" else "linear"
    common = {"method": method, "density": o["density"], "majority_sign_method": o["majority_sign_method"]}
    if ctype == "cat":
        xs = [a if part == "A" else b for a, b in factors]
        wts = [w * s for w, s in zip(ws, scales, strict=True)] if part == "A" else [1.0] * len(xs)
        nid = ev.plan.add("adapter_cat", tuple(x.node for x in xs), {"weights": wts, "dim": 0 if part == "A" else 1,
                                                                     "total": shape[0 if part == "A" else 1]},
                          group=ctx.group, loc=loc, shape=shape)
    elif ctype in LINEAR_FAMILY:
        ws_scaled = [w * s for w, s in zip(ws, scales, strict=True)]
        wts = [(abs(v) ** 0.5) * (1 if v >= 0 or part == "B" else -1) for v in ws_scaled]
        xs = [a if part == "A" else b for a, b in factors]
        nid = ev.plan.add("adapter_combine", tuple(x.node for x in xs), {"weights": wts, **common, "seed": seed},
                          group=ctx.group, loc=loc, shape=shape)
    else:
        rank = shape[0] if part == "A" else shape[1]
        in_f = factors[0][0].shape[1]
        packed = ev.plan.add("adapter_svd", tuple(n for a, b in factors for n in (a.node, b.node)),
                             {"weights": ws, "scales": scales, **common, "seed": tensor_seed(int(o["seed"]), module),
                              "rank": rank, "transpose": emb, "clamp": float(o["svd_clamp"] or -1.0),
                              "full_matrices": bool(o["svd_full_matrices"])}, group=ctx.group, loc=loc)
        nid = ev.plan.add("unpack", (packed,), {"offset": 0 if part == "A" else rank * in_f,
                                               "shape": [float(d) for d in shape]}, group=ctx.group, loc=loc,
                          shape=shape)
    return TensorV(nid, shape, factors[0][0].dtype)
