"""Architecture knowledge as data: how layer stacks are named and counted, and what a
`slices` output's config becomes. Layout conversions (MoE experts, upscaling) join this
room as modules of their own."""

from __future__ import annotations

import re

# A tensor inside the layer stack: <prefix>.<index>.<rest>. Covers Llama/Mistral/Qwen
# (model.layers.N), GPT-2 (transformer.h.N), BERT (encoder.layer.N), ViT/CLIP
# (encoder.layers.N), T5/timm style (blocks.N / block.N).
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|layer|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")

# Non-layer tensors that come before the layer stack (embeddings); all others (final
# norm, heads, poolers) come after it. Passthrough takes the former from the first slice
# and the latter from the last, as MergeKit does.
PRE_LAYER_MARKERS = ("embed", "wte", "wpe", "embeddings", "patch", "cls_token", "position")


def is_pre_layer(tensor: str) -> bool:
    return any(m in tensor for m in PRE_LAYER_MARKERS)


# Config keys that hold the number of layers, by priority.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_of(tensor: str) -> int | None:
    m = LAYER_RE.match(tensor)
    return int(m.group("index")) if m else None


def split_layer(tensor: str) -> tuple[str, int, str] | None:
    m = LAYER_RE.match(tensor)
    return (m.group("prefix"), int(m.group("index")), m.group("rest")) if m else None


def count_layers(config: dict, tensors) -> int:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    idx = [i for i in (layer_of(t) for t in tensors) if i is not None]
    return max(idx) + 1 if idx else 0


def gradient_t(layer: int | None, num_layers: int) -> float:
    """MergeKit's position in a gradient: layer / (num_layers - 1); 0 outside the stack."""
    if layer is None or num_layers <= 1:
        return 0.0
    return layer / (num_layers - 1)


def gradient_value(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of a list of values at t in [0, 1] (MergeKit)."""
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    i0 = min(int(scaled), len(values) - 1)
    i1 = min(i0 + 1, len(values) - 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_count_overrides(config: dict, n: int) -> dict:
    """Config keys to set when an output has `n` layers (keys of `LAYER_COUNT_KEYS` the
    config has, else `num_hidden_layers`)."""
    out = {k: n for k in LAYER_COUNT_KEYS if k in config}
    return out or {"num_hidden_layers": n}


# Config keys that are lists but never hold one entry per layer.
NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                           "eos_token_id", "bos_token_id", "pad_token_id", "forced_decoder_ids"})


def nested_layer_config(config: dict) -> str | None:
    """The key of a nested sub-config (e.g. `text_config` of a vision-language model)
    that holds its own layer count, or None."""
    for key, value in config.items():
        if isinstance(value, dict) and any(isinstance(value.get(k), int) for k in LAYER_COUNT_KEYS):
            return key
    return None


def slice_config_overrides(reference: dict, layers: list[tuple[dict, int, int]]) -> dict:
    """Config keys of a `slices` output whose output layer j is source layer
    `layers[j] = (source config, source layer, source layer count)`.

    Sets the layer count (`layer_count_overrides`) and rebuilds every per-layer list of
    the reference config (a list with one entry per layer, e.g. Qwen2/Gemma
    `layer_types`) from the source layers: output entry j is the source model's entry at
    its source layer (MergeKit passthrough carries no such lists; transformers reads them
    per layer). Raises ValueError naming the key when a per-layer list cannot be
    rebuilt: a source config lacks it or has another length, or a list that looks like
    layer indices (e.g. `mlp_only_layers`) would need renumbering."""
    out = layer_count_overrides(reference, len(layers))
    n_ref = layers[0][2] if layers else 0
    for key, value in reference.items():
        if not isinstance(value, list) or key in NOT_PER_LAYER:
            continue
        if len(value) == n_ref and n_ref > 0:
            rebuilt = []
            for cfg, layer, n in layers:
                src = cfg.get(key)
                if not isinstance(src, list) or len(src) != n:
                    raise ValueError(f"config key '{key}' has one entry per layer in the first model but not in "
                                     f"every sliced model")
                rebuilt.append(src[layer])
            out[key] = rebuilt
        elif "layer" in key or key.endswith(("_idx", "_idxs", "_indices")):
            raise ValueError(f"config key '{key}' lists layers ({value!r}) and cannot be renumbered for the sliced "
                             f"layers")
    return out
