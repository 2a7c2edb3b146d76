"""`bitdelta_stats(base, model, data, ...)`: the BitDelta stage as a plan source.

One stage per (base, fine-tune, data, arguments) (stages/bitdelta.py). Per tensor name
the builtin evaluates to a one-element list: the load of the compressed weight's scale
([1]), of a calibrated parameter's trained value (calibrate="all"), or `UNCOVERED` for a
tensor the stage does not produce, so the stdlib's `bitdelta` falls back to the fine-tune.
"""

from __future__ import annotations

import json

from .. import ir
from .graph import SourceSpec, shape_numel
from .stage_values import (
    UNCOVERED,
    DataV,
    _arg_spans,
    _check_data,
    _source_key,
    _whole,
    reject_bad,
)
from .values import EvalError, TensorCtx, TensorV, at


def call(ev, e: ir.CallE, args: dict, ctx: TensorCtx, env: tuple = ()) -> list:
    """Evaluate `bitdelta_stats(...)` at tensor `ctx` (stage_values.call's contract)."""
    ev.__dict__["_stage_env"] = env
    arg_span = dict(_arg_spans(ev, e))
    base, model, data = args["base"], args["model"], args["data"]
    for name, v in (("base", base), ("model", model)):
        if not isinstance(v, TensorV):
            raise EvalError("E005", f"bitdelta_stats() takes one model as {name}", arg_span.get(name, e.span),
                            "pass a model, not a list")
    if not isinstance(data, DataV):
        raise EvalError("E005", "the data of bitdelta_stats() must be one data value", arg_span.get("data", e.span),
                        'declare it: data calib = dataset("calib.jsonl", text="text")')
    p = {"lr": args.get("lr", 1e-4), "batch_size": args.get("batch_size", 4), "num_steps": args.get("num_steps", 100),
         "max_length": args.get("max_length", 128), "calibrate": args.get("calibrate", "all")}
    bad = [("lr", not (isinstance(p["lr"], (int, float)) and p["lr"] > 0), "AdamW's learning rate, e.g. lr=0.0001"),
           ("batch_size", not _whole(p["batch_size"], 1), "e.g. batch_size=4"),
           ("num_steps", not _whole(p["num_steps"], 0), "e.g. num_steps=100"),
           ("max_length", not _whole(p["max_length"], 1), "tokens per row (padded), e.g. max_length=128"),
           ("calibrate", p["calibrate"] not in ("all", "scales"),
            'calibrate="all" (every parameter, as FusionBench) or "scales" (the paper\'s)')]
    reject_bad(bad, p, arg_span, e, "bitdelta")
    p.update(lr=float(p["lr"]), batch_size=int(p["batch_size"]), num_steps=int(p["num_steps"]),
             max_length=int(p["max_length"]))
    if d := _needs_text(data):
        raise EvalError("E006", d, data.span, 'name the text column: dataset("calib.jsonl", text="text")')
    if ev.dry:
        return [TensorV(ev.plan.add("load", (), {"source": e.target, "tensor": ctx.tensor}, group=ctx.group), None, None)]
    base_key = _source_key(ev, e, base, arg_span.get("base", e.span))
    key = _source_key(ev, e, model, arg_span.get("model", e.span))
    memo = ev.__dict__.setdefault("_stages", {})
    mkey = (e.target, base_key, key, json.dumps(data.spec, sort_keys=True), json.dumps(p, sort_keys=True))
    if mkey not in memo:
        memo[mkey] = _register(ev, e, base_key, key, data, p)
    sk = memo[mkey]
    return [ev.load(sk, ctx, e.span) if ctx.tensor in ev.plan.sources[sk].tensors else UNCOVERED]


def _needs_text(d: DataV) -> str | None:
    if d.spec["kind"] == "files" and not d.spec.get("text"):
        return "bitdelta() calibrates on text, and this data names no text column"
    return None


def _register(ev, e: ir.CallE, base_key: str, key: str, d: DataV, p: dict) -> str:
    from ..stages.data import describe
    from ..stages.pruning import stack_linears

    src, base = ev.plan.sources[key], ev.plan.sources[base_key]
    _check_data(ev, d)
    module = _meta_causal_lm(src.path, e)
    comp = set(stack_linears(module))
    if not comp:
        raise EvalError("E014", f"bitdelta() found no Linear layer inside a numbered layer stack of '{key}'", e.span,
                        "BitDelta compresses the Linear weights of a transformer's layers")
    for t in sorted(comp):
        if t not in base.tensors or tuple(base.tensors[t][1]) != tuple(src.tensors[t][1]):
            raise EvalError("E014", f"bitdelta(): the base has no tensor '{t}' of the fine-tune's shape "
                            f"{list(src.tensors[t][1])}", e.span, "base and model must share an architecture")
    trained = {n for n, prm in module.named_parameters()} - comp if p["calibrate"] == "all" else set()
    tensors = {t: ("F32", (1,), "") for t in comp if t in src.tensors}
    tensors.update({t: ("F32", tuple(src.tensors[t][1]), "") for t in trained if t in src.tensors})
    model_bytes = sum(4 * shape_numel(s) for _, s, _ in src.tensors.values())
    sk = f"bitdelta[{key}]"
    while sk in ev.plan.sources:
        sk += "'"
    stage = {"kind": "bitdelta", "model": key, "model_dir": src.path, "model_dirs": [base.path],
             "data": d.spec, "data_text": describe(d.spec), "params": p, "tensors": sorted(tensors),
             "estimate": {"examples": p["num_steps"] * p["batch_size"], "batches": p["num_steps"],
                          "batch_size": p["batch_size"], "passes": "forward+backward", "models_resident": 3,
                          "peak_bytes": model_bytes * 7}}
    ev.plan.sources[sk] = SourceSpec(sk, "", tensors, {}, at(e.span), stage)
    return sk


def _meta_causal_lm(model_dir: str, e: ir.CallE):
    import torch

    from ..zoo.text import _quiet_transformers

    _quiet_transformers()
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise EvalError("E014", f"bitdelta() needs a causal language model; '{model_dir}' is not one ({err})",
                        e.span, "BitDelta compresses fine-tuned LLMs (AutoModelForCausalLM)") from None
