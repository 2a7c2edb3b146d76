"""WEMoE (weight-ensembling mixture of experts) as layout data: which Linear layers form
each transformer layer's MLP, and which tensors a WEMoE model has.

WEMoE (Tang et al., ICML 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture
of Experts"; FusionBench 0.2.33 `WeightEnsemblingMoE`, `clip_weight_ensembling_moe`):
every tensor outside the MLPs is task arithmetic θ₀ + λ·Σᵢ τᵢ (λ = `init_lambda`); each
layer's MLP computes, for an input sample x (tokens x_t),

    w(x) = mean_t router(x_t)                  [E]   (router: hidden → hidden → E, ReLU)
    MLP weights = θ₀ + Σᵢ wᵢ(x) · τᵢ           (per sample; τᵢ = the expert's MLP − the base's)

the router trained at test time by minimising the entropy of the predictions on
unlabeled inputs (`stages.wemoe`). Here the MLP's Linear layers each hold their task
vectors, and the first of them (whose input is the MLP's input) holds the router; the
others use its weights (`arch.wemoe_module`). The mean over tokens counts real tokens
only when the model is called with an attention mask (FusionBench averages over every
position, padding included; the same for inputs without padding).

Tensors of a WEMoE Linear `L` (E experts, weight [out, in]):
    L.weight [out, in], L.bias [out]    the base's layer
    L.wemoe_tv_weight [E, out, in]      the experts' task vectors
    L.wemoe_tv_bias [E, out]            only when the layer has a bias
and on the first Linear of each MLP, the router (FusionBench's parameter names):
    router_hidden_layers=2: L.wemoe_router.fc1.weight [H, H], .fc1.bias [H], .fc2.weight [E, H], .fc2.bias [E]
    router_hidden_layers=1: L.wemoe_router.fc.weight [E, H], .fc.bias [E]
    router_hidden_layers=0: L.wemoe_router.weight [E]
"""

from __future__ import annotations

from . import split_layer

WEMOE_LINEAR = "wemoe_linear"
# Each layer's MLP as its Linear layers in forward order (the first one's input is the
# MLP's input, which the router reads), by the name they have within the layer.
MLP_GROUPS = (
    ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),  # Llama, Mistral, Qwen2, Gemma
    ("mlp.fc1", "mlp.fc2"),  # CLIP, Phi, ViT-style mlp.fc1/fc2
    ("intermediate.dense", "output.dense"),  # BERT, RoBERTa, MiniLM, HF ViT
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),  # GPT-NeoX, Falcon
    ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"),  # T5 encoder
)


def mlp_groups(linears: list[str]) -> dict[str, list[str]]:
    """Layer (e.g. "encoder.layer.3") -> its MLP's Linear layers in forward order, for
    every layer whose Linears include one of MLP_GROUPS entirely."""
    by_layer: dict[str, set[str]] = {}
    for name in linears:
        s = split_layer(name)
        if s:
            by_layer.setdefault(f"{s[0]}.{s[1]}", set()).add(s[2])
    out = {}
    for layer, rests in by_layer.items():
        for group in MLP_GROUPS:
            if set(group) <= rests:
                out[layer] = [f"{layer}.{r}" for r in group]
                break
    return out


def router_tensors(leader: str, hidden: int, n: int, depth: int) -> dict[str, tuple[int, ...]]:
    """The router's tensor names (on the MLP's first Linear `leader`) and shapes."""
    r = f"{leader}.wemoe_router"
    if depth == 0:
        return {f"{r}.weight": (n,)}
    if depth == 1:
        return {f"{r}.fc.weight": (n, hidden), f"{r}.fc.bias": (n,)}
    return {f"{r}.fc1.weight": (hidden, hidden), f"{r}.fc1.bias": (hidden,), f"{r}.fc2.weight": (n, hidden),
            f"{r}.fc2.bias": (n,)}


def output_tensors(shapes: dict[str, tuple[int, ...]], groups: dict[str, list[str]], n: int, depth: int
                   ) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """The output tensors of a WEMoE model in the base's order, each Linear's own tensors
    after its bias: name -> (kind, Linear, shape); kind: "merged" (task arithmetic),
    "weight" / "bias" (the base's layer), "tv_weight", "tv_bias", "router"."""
    member = {m: layer for layer, ms in groups.items() for m in ms}
    leaders = {ms[0] for ms in groups.values()}
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}

    def extras(mod: str) -> None:
        o, i = shapes[f"{mod}.weight"]
        out[f"{mod}.wemoe_tv_weight"] = ("tv_weight", mod, (n, o, i))
        if f"{mod}.bias" in shapes:
            out[f"{mod}.wemoe_tv_bias"] = ("tv_bias", mod, (n, o))
        if mod in leaders:
            for t, s in router_tensors(mod, i, n, depth).items():
                out[t] = ("router", mod, s)

    done = set()
    for name, shape in shapes.items():
        mod, _, leaf = name.rpartition(".")
        if mod in member and leaf in ("weight", "bias"):
            out[name] = (leaf, mod, tuple(shape))
            if (leaf == "bias" or f"{mod}.bias" not in shapes) and f"{mod}.weight" in out:
                extras(mod)
                done.add(mod)
        else:
            out[name] = ("merged", "", tuple(shape))
    for mod in member:
        if mod not in done:
            extras(mod)
    return out


def module_specs(groups: dict[str, list[str]], shapes: dict, n: int, depth: int) -> dict[str, dict]:
    """The description entries (`arch.upscaled`) of the WEMoE Linears."""
    specs = {}
    for layer, members in groups.items():
        for j, m in enumerate(members):
            specs[m] = {"type": WEMOE_LINEAR, "num_experts": n, "group": layer, "router": j == 0,
                        "router_hidden_layers": depth, "bias": f"{m}.bias" in shapes}
    return specs


def wemoe_tensor_names(spec: dict) -> tuple[str, ...]:
    """The tensor names (relative to the module) a WEMoE Linear adds."""
    names = ["wemoe_tv_weight"] + (["wemoe_tv_bias"] if spec.get("bias") else [])
    if spec.get("router"):
        depth = int(spec.get("router_hidden_layers", 2))
        names += [t.removeprefix("L.") for t in router_tensors("L", 1, 1, depth)]
    return tuple(names)


def wemoe_linear(base, tensors: dict, spec: dict, shared: dict):
    """A `WELinear` (`arch.wemoe_module`) from a loaded base `nn.Linear`, its tensors and
    `shared` (one routing state per MLP, created on first use)."""
    from .wemoe_module import WELinear, routing_state

    state = routing_state(shared, spec["group"])
    router = None
    if spec.get("router"):
        from .wemoe_module import Router

        router = Router.from_tensors({k.removeprefix("wemoe_router."): v for k, v in tensors.items()
                                      if k.startswith("wemoe_router.")}, int(spec.get("router_hidden_layers", 2)))
    return WELinear(base, tensors["wemoe_tv_weight"], tensors.get("wemoe_tv_bias"), state, router)
