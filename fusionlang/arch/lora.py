"""A PEFT LoRA adapter as layout data: which tensors an adapter extracted from a
fine-tune holds, what its adapter_config.json says, and which files it is written as.

Extract-LoRA (MergeKit 0.1.5 `mergekit-extract-lora`): for each module of the
fine-tuned model's class that has a weight,

    nn.Linear L (weight [out, in]) included by the include / exclude regexes: Δ = W_ft − W_base = U·diag(S)·Vᵀ, rank r = min(max_rank, min(out, in))
        base_model.model.L.lora_A.weight  [r, in]   = diag(√S_r)·V_rᵀ   (distribute_scale)
        base_model.model.L.lora_B.weight  [out, r]  = U_r·diag(√S_r)        (else S_r on A)
        base_model.model.L.lora_B.bias    [out]     = b_ft − b_base          (if L has a bias)
    nn.Embedding E (weight [vocab, dim]) with embed_lora: the same of Δᵀ,
        base_model.model.E.lora_embedding_A  [r, vocab],  ...lora_embedding_B  [dim, r]
    the input / output embeddings without embed_lora, any module named in
    modules_to_save, and every other module with a weight (norms, convolutions: MergeKit
    would take a batched SVD of a 3-D or 4-D Δ that PEFT cannot load; unless
    skip_undecomposable): the fine-tune's own tensors at full rank,
        base_model.model.<name>.weight (and .bias)  — listed in `modules_to_save`

so that PEFT's `PeftModel.from_pretrained(base, dir)` computes W_base + B·A (alpha = r).
`sv_epsilon > 0` zeroes the singular values ≤ epsilon: the adapter keeps its rank r with
zero rows in A and columns in B where MergeKit drops them (the same B·A).
"""

from __future__ import annotations

import re

ADAPTER_FORMAT = "peft-lora"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."


def is_adapter(description: dict) -> bool:
    """Whether an output's description marks it as a PEFT LoRA adapter."""
    return isinstance(description, dict) and description.get("format") == ADAPTER_FORMAT


def adapter_tensors(modules: dict[str, tuple[str, bool]], shapes: dict[str, tuple[int, ...]], max_rank: int,
                    embed_lora: bool, modules_to_save: list[str], include: list[str], exclude: list[str],
                    skip_undecomposable: bool) -> tuple[dict[str, tuple], list[str]]:
    """The adapter's tensors and its `modules_to_save`, following MergeKit's
    `plan_extraction`. `modules`: module name (in the model class) -> (kind, io) for the
    modules that have a weight, kind "linear" (`nn.Linear`), "embedding"
    (`nn.Embedding`) or "other", io whether it is the model's input or output embedding;
    `shapes`: the checkpoint's tensors.

    Returns ({output tensor: (kind, checkpoint module, shape, rank)}, modules_to_save),
    kind one of "lora_A", "lora_B", "lora_B_bias", "lora_embedding_A",
    "lora_embedding_B", "full" (then the checkpoint tensor itself); in the class's
    module order."""
    saved = list(modules_to_save)
    out: dict[str, tuple] = {}
    for name, (kind, io) in modules.items():
        ckpt = _checkpoint_name(name, shapes)
        if ckpt is None:
            continue  # e.g. a head tied to the embeddings: no tensor of its own
        leaf = name.split(".")[-1]
        if not embed_lora and (io or kind == "embedding") and not any(re.search(r, name) for r in exclude) \
                and leaf not in saved:
            saved.append(leaf)
        if name in saved or leaf in saved:
            _full(out, name, ckpt, shapes)
        elif (not include or any(re.search(r, name) for r in include)) and not any(re.search(r, name) for r in exclude):
            w = shapes[f"{ckpt}.weight"]
            if kind in ("linear", "embedding") and len(w) == 2:
                o, i = (w[1], w[0]) if kind == "embedding" else (w[0], w[1])  # an embedding's Δ is transposed
                r = max(1, min(int(max_rank), o, i))
                lora = "lora_embedding_" if kind == "embedding" else "lora_"
                suffix = "" if kind == "embedding" else ".weight"
                out[f"{PREFIX}{name}.{lora}A{suffix}"] = (f"{lora}A", ckpt, (r, i), r)
                out[f"{PREFIX}{name}.{lora}B{suffix}"] = (f"{lora}B", ckpt, (o, r), r)
                if kind == "linear" and f"{ckpt}.bias" in shapes:
                    out[f"{PREFIX}{name}.lora_B.bias"] = ("lora_B_bias", ckpt, tuple(shapes[f"{ckpt}.bias"]), r)
            elif not skip_undecomposable:
                if leaf not in saved:
                    saved.append(leaf)
                _full(out, name, ckpt, shapes)
    return out, saved


def _full(out: dict, name: str, ckpt: str, shapes: dict) -> None:
    for leaf in ("weight", "bias"):
        if f"{ckpt}.{leaf}" in shapes:
            out[f"{PREFIX}{name}.{leaf}"] = ("full", f"{ckpt}.{leaf}", tuple(shapes[f"{ckpt}.{leaf}"]), 0)


def _checkpoint_name(module: str, shapes: dict) -> str | None:
    """The module's name in the checkpoint: as in the class, or without the class's
    first component (a `BertModel` checkpoint inside `BertForSequenceClassification`)."""
    for cand in (module, module.split(".", 1)[1] if "." in module else None):
        if cand and f"{cand}.weight" in shapes:
            return cand
    return None


def adapter_config(tensors: dict[str, tuple], modules_to_save: list[str], base_path: str, task_type: str) -> dict:
    """adapter_config.json for PEFT (MergeKit's `make_config_dict`): r and lora_alpha the
    largest rank, `rank_pattern` / `alpha_pattern` for modules of lower rank (alpha = r:
    scaling 1), `lora_bias` when a LoRA module carries a bias."""
    ranks = {}
    for name, (kind, _ckpt, _shape, r) in tensors.items():
        if kind in ("lora_A", "lora_embedding_A"):
            ranks[name[len(PREFIX):].rsplit(".lora_", 1)[0]] = r
    top = max(ranks.values(), default=1)
    other = {k: v for k, v in ranks.items() if v != top}
    return {"base_model_name_or_path": base_path, "peft_type": "LORA", "use_rslora": False,
            "target_modules": sorted({k.split(".")[-1] for k in ranks}), "modules_to_save": list(modules_to_save),
            "task_type": task_type, "r": top, "lora_alpha": top, "rank_pattern": other, "alpha_pattern": other,
            "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
            "lora_bias": any(k == "lora_B_bias" for k, *_ in tensors.values())}


def task_type(architectures: list[str]) -> str | None:
    """PEFT's task_type for a model class name (None: no task type, a bare model)."""
    name = architectures[0] if architectures else ""
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    return None
