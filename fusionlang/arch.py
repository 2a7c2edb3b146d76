"""Architecture knowledge as data: how layer stacks are named and counted."""

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
    """Config keys to set when an output has `n` layers."""
    out = {k: n for k in LAYER_COUNT_KEYS if k in config}
    if not out:
        out = {"num_hidden_layers": n}
    if isinstance(config.get("layer_types"), list) and config["layer_types"]:
        lt = config["layer_types"]
        out["layer_types"] = [lt[i % len(lt)] for i in range(n)]
    return out
