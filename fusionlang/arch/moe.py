"""Mixture-of-experts layouts as data: which dense models can become which MoE class, how
each dense MLP tensor becomes an expert tensor, the router's tensor, and the output config.

A dense Llama / Mistral / Qwen2 decoder layer has an MLP of three Linear weights
(`mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`). Its Mixtral counterpart keeps every
other tensor and replaces the MLP by E experts (each a copy of some model's MLP) and a
router (`gate`, a Linear [E, hidden] without bias). transformers stores the experts in
one of two layouts:

- `per_expert`: `block_sparse_moe.experts.{j}.w1 / w2 / w3.weight` (gate, down, up) and
  `block_sparse_moe.gate.weight`: what transformers 4.x loads natively and what 5.x's
  `save_pretrained` writes (5.x fuses them on load, `conversion_mapping.py`); vLLM and
  llama.cpp's converters read it too.
- `fused`: `mlp.experts.gate_up_proj` [E, 2·intermediate, hidden] (each expert's gate
  rows, then its up rows), `mlp.experts.down_proj` [E, hidden, intermediate] and
  `mlp.gate.weight`: the parameters of transformers 5.x's `MixtralExperts`, and what
  mergekit-moe 0.1.5 writes.

Qwen2-MoE (`qwen2_moe`) names its experts `mlp.experts.{j}.gate_proj / up_proj /
down_proj` (per_expert) or fuses them the same way, and adds a shared expert
(`mlp.shared_expert.*`, a dense MLP every token uses) weighted by a sigmoid gate
(`mlp.shared_expert_gate.weight` [1, hidden]).

`installed_layouts()` asks the installed transformers which of them it loads (the module's
own parameter names, and its checkpoint conversion table) instead of assuming a version.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

# output architecture -> (model_type of the inputs it accepts, config class, causal LM class)
OUTPUTS = {"mixtral": (("llama", "mistral"), "MixtralConfig", "MixtralForCausalLM"),
           "qwen2_moe": (("llama", "mistral", "qwen2"), "Qwen2MoeConfig", "Qwen2MoeForCausalLM")}
# the config key holding the number of experts
NUM_EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts"}
LAYOUTS = ("per_expert", "fused")
GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")

MLP_RE = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<layer>\d+)\.mlp\.(?P<role>gate_proj|up_proj|down_proj)\.(?P<kind>weight|bias)$")
# dense MLP role -> the per_expert layout's name of that weight
PER_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@dataclass(frozen=True)
class ExpertTensor:
    """How one output tensor is made. `kind`: "base" (the base model's tensor `source`),
    "expert" (expert `experts[0]`'s tensor `source`), "stack" (the experts' tensors
    `sources`, per expert concatenated along rows, stacked into [E, rows, cols]), or
    "router" (the router stage's matrix of layer `layer`). `residual`: a down
    projection (what mergekit-moe's residual_scale multiplies)."""

    kind: str
    source: str = ""  # "shared": the shared expert's tensor; "zeros": a bias the base lacks, `shape`
    experts: tuple[int, ...] = ()
    sources: tuple[str, ...] = ()
    layer: int = -1
    residual: bool = False
    shape: tuple[int, ...] = ()


def incompatibility(architecture: str, configs: dict[str, dict]) -> str | None:
    """Why models with these config.json contents (source key -> config) cannot become
    one `architecture` MoE, as a sentence naming the rule that failed; None when they can."""
    accepted, _, _ = OUTPUTS[architecture]
    types = {k: c.get("model_type") for k, c in configs.items()}
    for k, t in types.items():
        if t not in accepted:
            return (f"'{k}' is a {t or 'model without a model_type'} model, and a {architecture} MoE is built from "
                    f"{' or '.join(accepted)} models (the rule: every input's model_type is one of them)")
    if len(set(types.values())) > 1:
        shown = ", ".join(f"'{k}' {t}" for k, t in types.items())
        return f"the inputs mix model types ({shown}); a MoE's experts and base share one architecture"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        values = {k: c.get(key) for k, c in configs.items()}
        if len(set(map(str, values.values()))) > 1:
            shown = ", ".join(f"'{k}' {v}" for k, v in values.items())
            return f"the inputs differ in {key} ({shown}); every expert must have the base's shape"
    for k, c in configs.items():
        for flag in ("attention_bias", "mlp_bias"):  # (Qwen2's q/k/v biases are not attention_bias)
            if c.get(flag):
                return (f"'{k}' has {flag}=true, and {OUTPUTS[architecture][2]} has no such biases "
                        "(its weights would be dropped)")
    return None


def output_config(base: dict, architecture: str, num_experts: int, experts_per_token: int) -> dict:
    """The keys of the output's config.json that differ from the base's (as mergekit-moe
    writes them: no sliding window, the router picks `experts_per_token`; Qwen2-MoE:
    every layer sparse, top-k weights renormalised, experts and shared expert of the
    base's MLP width, q/k/v biases)."""
    _, _, cls = OUTPUTS[architecture]
    out = {"architectures": [cls], "model_type": architecture, NUM_EXPERTS_KEY[architecture]: num_experts,
           "num_experts_per_tok": experts_per_token, "sliding_window": None}
    if architecture == "qwen2_moe":
        width = base.get("intermediate_size")
        out.update({"decoder_sparse_step": 1, "norm_topk_prob": True, "use_sliding_window": False,
                    "shared_expert_intermediate_size": width, "moe_intermediate_size": width, "qkv_bias": True,
                    "mlp_only_layers": []})
    return out


QKV_RE = re.compile(r"^(?P<attn>.*\.layers\.\d+\.self_attn)\.(?P<proj>[qkv]_proj)\.weight$")


def output_tensors(base_shapes: dict[str, tuple], num_experts: int, layout: str, architecture: str = "mixtral"
                   ) -> dict[str, ExpertTensor]:
    """Output tensor name -> how to make it, in the base's order (`base_shapes`: its
    tensor names and shapes) with each layer's MLP replaced (at the place of its first
    MLP tensor) by the experts and the router; Qwen2-MoE adds the shared expert, its
    gate, and zero q/k/v biases where the base has none (as mergekit-moe)."""
    out: dict[str, ExpertTensor] = {}
    done: set[tuple[str, int]] = set()
    for name in base_shapes:
        m = MLP_RE.match(name)
        if not m:
            out[name] = ExpertTensor("base", name)
            q = QKV_RE.match(name)
            bias = name[: -len("weight")] + "bias"
            if architecture == "qwen2_moe" and q and bias not in base_shapes:
                out[bias] = ExpertTensor("zeros", shape=(int(base_shapes[name][0]),))
            continue
        prefix, layer = m.group("prefix"), int(m.group("layer"))
        if (prefix, layer) in done:
            continue
        done.add((prefix, layer))
        src = {role: f"{prefix}.{layer}.mlp.{role}.weight" for role in PER_EXPERT}
        mlp = f"{prefix}.{layer}.mlp"
        if architecture == "qwen2_moe":
            _experts(out, mlp, src, num_experts, layout, mixtral_names=False)
            out[f"{mlp}.gate.weight"] = ExpertTensor("router", layer=layer)
            for role in ("gate_proj", "up_proj", "down_proj"):
                out[f"{mlp}.shared_expert.{role}.weight"] = ExpertTensor("shared", src[role])
            out[f"{mlp}.shared_expert_gate.weight"] = ExpertTensor("shared_router", layer=layer)
        else:  # Mixtral's per-expert layout lives under block_sparse_moe, with w1 / w2 / w3
            moe = f"{prefix}.{layer}.block_sparse_moe" if layout == "per_expert" else mlp
            _experts(out, moe, src, num_experts, layout, mixtral_names=True)
            out[f"{moe}.gate.weight"] = ExpertTensor("router", layer=layer)
    return out


def _experts(out: dict, mlp: str, src: dict, n: int, layout: str, mixtral_names: bool) -> None:
    """Expert tensors of one layer under `mlp` (their dense sources `src` by role)."""
    if layout == "per_expert":
        for j in range(n):
            for role in ("gate_proj", "up_proj", "down_proj"):
                name = PER_EXPERT[role] if mixtral_names else role
                out[f"{mlp}.experts.{j}.{name}.weight"] = ExpertTensor("expert", src[role], (j,),
                                                                      residual=role == "down_proj")
    else:
        out[f"{mlp}.experts.gate_up_proj"] = ExpertTensor(
            "stack", experts=tuple(range(n)), sources=(src["gate_proj"], src["up_proj"]))
        out[f"{mlp}.experts.down_proj"] = ExpertTensor(
            "stack", experts=tuple(range(n)), sources=(src["down_proj"],), residual=True)


def mlp_layers(names) -> list[int]:
    """The layer indices that have a dense MLP (gate, up and down projections)."""
    roles: dict[int, set[str]] = {}
    for n in names:
        m = MLP_RE.match(n)
        if m and m.group("kind") == "weight":
            roles.setdefault(int(m.group("layer")), set()).add(m.group("role"))
    return sorted(i for i, r in roles.items() if r == set(PER_EXPERT))


@functools.cache
def installed_layouts(architecture: str) -> tuple[str, ...]:
    """The layouts of `architecture` the installed transformers loads: "fused" when its
    module's parameters are the fused expert tensors, "per_expert" when they are the
    per-expert Linear weights or its checkpoint conversion table maps those onto them.
    Remembered in the cache directory per transformers version (asking imports
    transformers' model code and builds a model on the meta device: seconds)."""
    import json
    from importlib.metadata import PackageNotFoundError, version

    from ..zoo.paths import cache_dir

    try:
        memo = cache_dir() / f"moe-layouts-transformers-{version('transformers')}.json"
    except PackageNotFoundError:
        memo = None
    try:
        known = json.loads(memo.read_text()) if memo and memo.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(architecture), list):
        return tuple(known[architecture])
    found = _ask_transformers(architecture)
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**known, architecture: list(found)}))
            os.replace(tmp, memo)
        except OSError:
            pass  # an unwritable cache only costs the seconds again
    return found


def _ask_transformers(architecture: str) -> tuple[str, ...]:
    import torch
    import transformers

    _, cfg_name, cls_name = OUTPUTS[architecture]
    cfg = getattr(transformers, cfg_name)(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          **{NUM_EXPERTS_KEY[architecture]: 2})
    with torch.device("meta"):
        names = set(getattr(transformers, cls_name)(cfg).state_dict())
    out = []
    if any(n.endswith(("experts.0.w1.weight", "experts.0.gate_proj.weight")) for n in names):
        return ("per_expert",)
    if any(n.endswith("experts.gate_up_proj") for n in names):
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            if get_checkpoint_conversion_mapping(architecture):
                out.append("per_expert")
        except ImportError:
            pass
        out.append("fused")
    return tuple(out)
