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
from .values import PROBE, EvalError, TensorCtx, TensorV, builtin_exprs, builtin_options

PROBE_CTX = TensorCtx(PROBE, PROBE, 0, 2)



def options(ev, call: ir.CallE) -> dict:
    """The call's non-model arguments, evaluated and checked; EvalError (E006) at the
    argument at fault."""
    o = builtin_options(ev, call, ("base", "model"))
    span = o["spans"]
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
    return o


def domain(ev, call: ir.CallE) -> dict:
    """The output tensors of an `extract_lora(...)` merge (the fields of a
    `domains.Domain`) and the adapter's description. EvalError when the models cannot
    be listed, differ in their tensors' shapes, or the patterns select nothing."""
    o = options(ev, call)
    exprs, span = builtin_exprs(call), o["spans"]
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
    exprs = builtin_exprs(call)
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
