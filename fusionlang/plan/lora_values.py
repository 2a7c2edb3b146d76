"""`extract_lora(base, model, ...)`: a PEFT LoRA adapter extracted from a fine-tune
(MergeKit's `mergekit-extract-lora`), as the evaluator sees it.

The output's tensors are those of `arch.lora.adapter_tensors` (LoRA factors of each
selected Linear / Embedding's task vector, and the modules saved at full rank). The A
and B factors of one module are computed in one tensor group, so each task vector is
decomposed once. The output is written as `adapter_model.safetensors` with an
`adapter_config.json` (`runtime.model_files`), which PEFT loads on the base model.
"""

from __future__ import annotations

import json
import re

from .. import arch, ir
from ..arch import lora as L
from ..arch import upscaled as U
from ..lang.signatures import BUILTINS
from .values import PROBE, EvalError, TensorCtx, TensorV

PARAMS = [name for name, _, _ in BUILTINS["extract_lora"].params]
PROBE_CTX = TensorCtx(PROBE, PROBE, 0, 2)


def _exprs(call: ir.CallE) -> dict[str, ir.Expr]:
    return dict(zip(PARAMS, call.args)) | dict(call.kwargs)


def options(ev, call: ir.CallE) -> dict:
    """The call's non-model arguments, evaluated and checked; EvalError (E006) at the
    argument at fault."""
    exprs = _exprs(call)
    defaults = {name: default for name, _, default in BUILTINS["extract_lora"].params}
    o = {k: (ev.eval(exprs[k], (), PROBE_CTX) if k in exprs else defaults[k]) for k in PARAMS
         if k not in ("base", "model")}
    span = {k: e.span for k, e in exprs.items()}
    v = o["max_rank"]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != int(v) or v < 1:
        shown = int(v) if isinstance(v, float) and v.is_integer() else v
        raise EvalError("E006", f"max_rank={shown!r} must be a whole number of at least 1", span.get("max_rank", call.span),
                        "the rank of each LoRA module, e.g. max_rank=32")
    o["max_rank"] = int(v)
    eps = o["sv_epsilon"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise EvalError("E006", f"sv_epsilon={eps!r} must be a number ≥ 0", span.get("sv_epsilon", call.span),
                        "singular values at or below it are dropped; 0 keeps every one")
    for arg in ("modules_to_save", "include", "exclude"):
        pats = o[arg]
        if pats is None:
            o[arg] = []
            continue
        if not isinstance(pats, list) or not all(isinstance(p, str) and p for p in pats):
            raise EvalError("E006", f"{arg} must be a list of strings", span.get(arg, call.span),
                            'e.g. modules_to_save=["lm_head"], include=["mlp"] (regexes searched in module names)')
        if arg != "modules_to_save":
            for p in pats:
                try:
                    re.compile(p)
                except re.error as e:
                    raise EvalError("E006", f"{arg}: {p!r} is not a regular expression ({e})",
                                    span.get(arg, call.span), "Python regular expressions, searched in module "
                                    "names (e.g. \"mlp\\\\.\")") from None
    o["spans"] = span
    return o


def domain(ev, call: ir.CallE) -> dict:
    """The output tensors of an `extract_lora(...)` merge (the fields of a
    `domains.Domain`) and the adapter's description. EvalError when the models cannot
    be listed, differ in their tensors' shapes, or the patterns select nothing."""
    o = options(ev, call)
    exprs, span = _exprs(call), o["spans"]
    keys = {}
    for arg in ("base", "model"):
        src = ev.first_source(exprs[arg])
        if src is None:
            raise EvalError("E005", f"extract_lora() needs a {arg} model", span.get(arg, call.span),
                            "write extract_lora(base, finetuned, max_rank=32)")
        keys[arg] = ev.source(src, ev.call_args(src, (), PROBE_CTX))
    h, hb = ev.headers[keys["model"]], ev.headers[keys["base"]]
    shapes = {k: tuple(t.shape) for k, t in h.tensors.items()}
    try:
        modules = U.weight_modules(json.dumps(h.config, sort_keys=True))
    except ValueError as e:
        raise EvalError("E014", f"cannot list the modules of '{keys['model']}': {e}", span.get("model", call.span),
                        "extract_lora() reads a transformers model whose config.json names its architecture") from None
    tensors, saved = L.adapter_tensors(modules, shapes, o["max_rank"], bool(o["embed_lora"]), o["modules_to_save"],
                                       o["include"], o["exclude"], bool(o["skip_undecomposable"]))
    if not any(kind.startswith("lora_") for kind, *_ in tensors.values()):
        raise EvalError("E008", f"no module of '{keys['model']}' is left to extract a LoRA from", call.span,
                        "check include= / exclude= (regexes searched in module names such as "
                        f"{next(iter(modules), 'model.layers.0.mlp.up_proj')})")
    for kind, ckpt, _shape, _r in tensors.values():
        if kind == "full":
            continue
        src = f"{ckpt}.bias" if kind == "lora_B_bias" else f"{ckpt}.weight"
        if src not in hb.tensors or tuple(hb.tensors[src].shape) != shapes[src]:
            have = tuple(hb.tensors[src].shape) if src in hb.tensors else "no such tensor"
            raise EvalError("E009", f"tensor '{src}' is {shapes[src]} in '{keys['model']}' but {have} in "
                            f"'{keys['base']}'", call.span, "extract a LoRA from a fine-tune of this base "
                            "(a fine-tune with added tokens: put the embeddings in modules_to_save)")
    kinds = {kind for kind, *_ in tensors.values()}
    if "lora_B_bias" in kinds and "lora_embedding_A" in kinds:
        raise EvalError("E006", "PEFT cannot load an adapter with both LoRA biases and LoRA embeddings (lora_bias is "
                        "not supported for Embedding layers)", span.get("embed_lora", call.span),
                        "leave embed_lora=false (the embeddings are saved whole), or exclude the layers with biases")
    ev.__dict__.setdefault("_lora", {})[id(call)] = (tensors, o)
    num_layers = arch.count_layers(h.config, h.tensors)
    source_of, group_of = {}, {}
    for name, (kind, ckpt, _shape, _r) in tensors.items():
        src = ckpt if kind == "full" else f"{ckpt}.bias" if kind == "lora_B_bias" else f"{ckpt}.weight"
        source_of[name] = (0, src, arch.layer_of(src), num_layers)
        if kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            group_of[name] = f"{ckpt}.lora"  # one unit: each task vector decomposed once for A and B
    config = L.adapter_config(tensors, saved, hb.path, L.task_type(h.config.get("architectures") or []))
    lora = [t for t in tensors.values() if t[0] in ("lora_A", "lora_embedding_A")]
    note = (f"PEFT LoRA adapter: {len(lora)} modules, rank ≤ {config['r']}, "
            f"{len(saved)} module name(s) saved at full rank ({', '.join(saved) or 'none'})")
    return {"names": list(tensors), "reference": keys["model"], "num_layers": num_layers, "source_of": source_of,
            "group_of": group_of, "description": {"format": L.ADAPTER_FORMAT, "adapter_config": config},
            "note": note}


def eval_lora(ev, call: ir.CallE, ctx: TensorCtx) -> TensorV:
    """Output tensor `ctx.output`'s value (see `arch.lora`)."""
    if id(call) not in ev.__dict__.get("_lora", {}):
        domain(ev, call)
    tensors, o = ev._lora[id(call)]
    kind, _ckpt, shape, r = tensors[ctx.output or ctx.group]
    exprs = _exprs(call)
    loc = ev._loc(call.span)
    model = ev.eval(exprs["model"], (), ctx)
    if kind == "full":
        return model
    base = ev.eval(exprs["base"], (), ctx)
    ev._same_shape([base, model], call.span, ctx, "extract_lora()")
    if kind == "lora_B_bias":
        nid = ev.plan.add("sub", (model.node, base.node), {}, group=ctx.group, loc=loc, shape=model.shape)
        return TensorV(nid, model.shape, model.dtype)
    embedding = kind.startswith("lora_embedding_")
    o_f, i_f = (base.shape[1], base.shape[0]) if embedding else base.shape
    packed = ev.plan.add("lora_factors", (base.node, model.node),
                         {"rank": r, "distribute_scale": bool(o["distribute_scale"]),
                          "sv_epsilon": float(o["sv_epsilon"]), "transpose": embedding},
                         group=ctx.group, loc=loc, shape=(r * i_f + o_f * r,))
    offset = 0 if kind.endswith("A") else r * i_f
    nid = ev.plan.add("unpack", (packed,), {"offset": offset, "shape": [float(d) for d in shape]},
                      group=ctx.group, loc=loc, shape=shape)
    return TensorV(nid, shape, model.dtype)


# -- LoRA adapters as inputs: lora(base, "adapter_dir") ------------------------------------

def _adapter(ev, call: ir.CallE, path: str) -> str:
    """The plan source key of an adapter directory (read once per spec); EvalError at
    the path argument when it cannot be read or applied."""
    from ..lang.values import spec_path
    from ..runtime.sources import SourceError, read_adapter_dir
    from .graph import SourceSpec
    from .values import at

    full = spec_path(call.span.file, path)
    seen = ev.__dict__.setdefault("_adapters", {})
    if full in seen:
        return seen[full]
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
    key = _adapter(ev, call, str(args["path"]))
    src = ev.plan.sources[key]
    prefix = L.PREFIX
    modules = ev.__dict__.setdefault("_adapter_modules", {})
    if key not in modules:
        names: dict[str, set] = {}
        for t in src.tensors:
            if t.startswith(prefix):
                mod, _, leaf = t[len(prefix):].rpartition(".")
                if ".lora_" in t:
                    mod = t[len(prefix):].split(".lora_", 1)[0]
                names.setdefault(mod, set()).add(t)
        modules[key] = names
    module, _, leaf = ctx.tensor.rpartition(".")
    am = _adapter_module(modules[key], module)
    if am is None:
        return base
    loc = ev._loc(call.span)
    full = f"{prefix}{am}.{leaf}"
    if full in src.tensors:  # modules_to_save: the adapter's tensor replaces the base's
        return _checked(ev, ev.load(key, TensorCtx(full, ctx.group, ctx.layer, ctx.num_layers), call.span), base,
                        call, key, full)
    cfg = src.config
    r = _pattern_value(cfg.get("rank_pattern"), am, cfg.get("r", 8))
    alpha = _pattern_value(cfg.get("alpha_pattern"), am, cfg.get("lora_alpha", r))
    scale = float(args.get("scale", 1.0)) * (alpha / (r ** 0.5 if cfg.get("use_rslora") else r))
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
