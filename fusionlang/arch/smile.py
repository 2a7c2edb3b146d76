"""SMILE upscaling as layout data and a module: which tensors a SMILE model has, and
the torch module that computes with them.

SMILE (Tang et al. 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts
Construction From Pre-Trained Foundation Models"; FusionBench 0.2.33
`SmileUpscalingAlgorithm` / `SmileMoELinear`) replaces every Linear layer y = W_0·x + b_0
of the pretrained model by

    y = W_0·x + b_0 + Σ_{i ∈ top-k(r(x))} p_i(x) · (u_i·(svh_i·x) + (b_i − b_0))
    r_i(x) = ‖gate_i·x‖₂ ,  p = softmax(r) renormalised over the top_k experts

with u_i, svh_i the rank-k SVD factors of expert i's task vector W_i − W_0 and gate_i
its gate_k leading right singular vectors (`ops.svd.smile_factors`). Every other tensor
is the pretrained model's (or, with `average_experts`, the experts' mean).

Tensors of a SMILE Linear `L` (E experts, weight [out, in]):
    L.weight [out, in], L.bias [out]   the pretrained layer (the base class's names)
    L.smile_gate [E, gate_k, in]
    L.smile_u    [E, out, k]
    L.smile_svh  [E, k, in]
    L.smile_bias [E, out]              only when the layer has a bias
"""

from __future__ import annotations

SMILE_LINEAR = "smile_linear"
SUFFIXES = ("smile_gate", "smile_u", "smile_svh", "smile_bias")


def smile_tensor_names(spec: dict) -> tuple[str, ...]:
    """The tensor names (relative to the module) a SMILE Linear adds."""
    return SUFFIXES if spec.get("bias") else SUFFIXES[:3]


def output_tensors(shapes: dict[str, tuple[int, ...]], linears: list[str], n: int, k: int, gate_k: int
                   ) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """The output tensors of a SMILE model, in the base's order with each Linear's SMILE
    tensors after its bias: name -> (kind, linear module, shape); kind is "base" (a
    tensor of the base, or the experts' mean with average_experts), "weight"/"bias"
    (the pretrained layer) or one of SUFFIXES."""
    from ..ops.svd import smile_sizes

    lin = set(linears)
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    pending: dict[str, list] = {}
    for name, shape in shapes.items():
        mod, _, leaf = name.rpartition(".")
        if mod in lin and leaf in ("weight", "bias"):
            out[name] = (leaf, mod, tuple(shape))
            if leaf == "weight":
                o, i = shape
                kk, gk = smile_sizes(o, i, k, gate_k)
                has_bias = f"{mod}.bias" in shapes
                extra = [("smile_gate", (n, gk, i)), ("smile_u", (n, o, kk)), ("smile_svh", (n, kk, i))]
                if has_bias:
                    extra.append(("smile_bias", (n, o)))
                pending[mod] = extra
            if leaf == "bias" or f"{mod}.bias" not in shapes:
                for suffix, s in pending.pop(mod, []):
                    out[f"{mod}.{suffix}"] = (suffix, mod, s)
        else:
            out[name] = ("base", "", tuple(shape))
    for mod, extra in pending.items():  # a bias listed before its weight
        for suffix, s in extra:
            out[f"{mod}.{suffix}"] = (suffix, mod, s)
    return out


def module_specs(tensors: dict[str, tuple[str, str, tuple[int, ...]]], n: int, top_k: int) -> dict[str, dict]:
    """The description entries (`arch.upscaled`) of the SMILE Linears of `tensors`."""
    specs: dict[str, dict] = {}
    for kind, mod, shape in tensors.values():
        if kind == "smile_u":
            specs.setdefault(mod, {}).update({"type": SMILE_LINEAR, "num_experts": n, "k": shape[2], "top_k": top_k})
        if kind == "smile_gate":
            specs.setdefault(mod, {})["gate_k"] = shape[1]
    for mod, spec in specs.items():
        spec["bias"] = f"{mod}.smile_bias" in tensors
    return specs


def smile_linear(base, tensors: dict, spec: dict, _shared: dict | None = None):
    """A `SmileLinear` (`arch.smile_module`) from a loaded base `nn.Linear` and its
    SMILE tensors."""
    from .smile_module import SmileLinear

    return SmileLinear(base, tensors["smile_gate"], tensors["smile_u"], tensors["smile_svh"],
                       tensors.get("smile_bias"), int(spec["top_k"]))
