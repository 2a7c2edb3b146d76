"""The pruning stage: Wanda's and SparseGPT's input statistics, layer by layer.

Both methods prune a model's numbered layers in order, each measured on the inputs the
already pruned layers below it produce (Sun et al. 2024; Frantar & Alistarh 2023; the
procedure of FusionBench 0.2.33 `WandaPruningForLlama` / `SparseGPTPruningForLlama`):

1. the calibration data runs through the model up to the first layer of the stack, whose
   inputs (hidden states and every keyword the model passes its layers: attention mask,
   rotary position embeddings, ...) are kept, one entry per batch;
2. for layer l: the layer runs on the kept inputs with hooks on each of its Linear modules
   (the statistic of each module's input rows, padding left out unless include_padding:
   stages/statistics.GramHooks); each Linear weight is pruned with that statistic
   (ops/calibrated.py: the same function the plan applies afterwards); the layer runs
   again and its outputs become layer l + 1's inputs.

The stage's results are the statistics, per Linear weight of the stack (Wanda: the mean
squared input per feature [in]; SparseGPT: the Gram matrix [in, in]); the stdlib's
`wanda` / `sparsegpt` prune the model's weights with them per tensor, which reproduces
the pruned layers exactly (the same function on the same inputs). Tensors outside the
stack, and weights that are not Linear, are not pruned (as FusionBench). One model
resident; activations of the whole calibration set at one layer's input are kept
(rows × tokens × hidden × 4 bytes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import data as D
from . import models as M
from .regmean_pp import layer_index
from .statistics import GramHooks, keep_mask

METHODS = ("wanda", "sparsegpt")


class _Stop(Exception):
    """Raised by the hook that catches the first layer's inputs: the rest of the forward
    pass is not needed."""


def stack_linears(module: torch.nn.Module, names: dict[str, str] | None = None) -> dict[str, torch.nn.Linear]:
    """The nn.Linear modules inside the model's numbered layer stack, by the file tensor
    name of their weight (`names`: module parameter name -> file name, as a StageModel's;
    default: the module's own parameter names). What Wanda, SparseGPT and BitDelta
    compress (for Llama-family models FusionBench's rule, the `*proj*` children of `mlp`
    and `self_attn`, picks the same)."""
    out = {}
    for mname, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = f"{mname}.weight" if names is None else names.get(f"{mname}.weight")
            if w is not None and layer_index(w) is not None:
                out[w] = m
    return out


def covered(sm: M.StageModel, method: str) -> dict[str, tuple[int, ...]]:
    """File tensor name -> shape of the statistic, for every Linear weight inside the
    model's numbered layer stack (works on a meta-device module: compile time)."""
    return {w: (m.in_features,) if method == "wanda" else (m.in_features, m.in_features)
            for w, m in stack_linears(sm.module, sm.names).items()}


def _stack(sm: M.StageModel) -> torch.nn.ModuleList:
    """The module list of the numbered layers (e.g. LlamaModel.layers, BertEncoder.layer)."""
    prefixes = set()
    for mname, _ in sm.module.named_modules():
        parts = mname.split(".")
        for k in range(1, len(parts)):
            if parts[k].isdigit():
                prefixes.add(".".join(parts[:k]))
                break
    stacks = [p for p in sorted(prefixes) if isinstance(sm.module.get_submodule(p), torch.nn.ModuleList)]
    if len(stacks) != 1:
        raise D.DataError("E014", f"pruning with calibration data needs one stack of numbered layers; the model has "
                          f"{len(stacks)} ({', '.join(stacks) or 'none'})", "prune this model by magnitude instead")
    return sm.module.get_submodule(stacks[0])


def stats(stage: dict, device, log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The statistics of every Linear weight of the stack, measured layer by layer on the
    pruned layers' outputs (module docstring). Returns file tensor name -> float32 CPU
    tensor. Raises DataError (E014) for a model without one numbered layer stack."""
    from ..ops.calibrated import sparsegpt_prune, wanda_prune

    p = stage["params"]
    method = p["method"]
    bs, include_padding = int(p["batch_size"]), bool(p["include_padding"])
    ex = D.load(stage["data"])
    sm = M.build(stage["model_dir"], stage["data"], device)
    if not include_padding:
        ex = M.by_length(sm, ex)
    layers = _stack(sm)
    config = getattr(sm.module, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False  # a key/value cache would grow each time a layer runs again
    caught: list[tuple[tuple, dict, torch.Tensor | None]] = []
    keep: list[torch.Tensor | None] = [None]

    def catch(_mod, args, kwargs):
        caught.append((args, kwargs, keep[0]))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for start, stop in M.batches(ex, bs):
                for part in M.passes(sm.inputs(ex, start, stop)):
                    keep[0] = None if include_padding else keep_mask(part)
                    try:
                        sm.run(part)
                    except _Stop:
                        pass
    finally:
        handle.remove()
        if use_cache:
            config.use_cache = use_cache
    linears = stack_linears(sm.module, sm.names)
    out: dict[str, torch.Tensor] = {}
    args = {k: p[k] for k in ("prune_type", "sparsity_ratio", "n", "m")}
    for li, layer in enumerate(layers):
        mine = {id(m) for m in layer.modules()}
        here = {w: m for w, m in linears.items() if id(m) in mine}
        with GramHooks(here) as hooks, torch.no_grad():
            for a, kw, k in caught:
                hooks.keep = k
                layer(*a, **kw)
                hooks.pass_done()
        grams = hooks.result({w: (m.in_features, m.in_features) for w, m in here.items()})
        with torch.no_grad():
            for w, m in here.items():
                if w not in grams:
                    continue
                g = grams[w]
                if method == "wanda":
                    st = torch.diagonal(g).clone()
                    new = wanda_prune([m.weight.data], [st], **args)
                else:
                    st = g
                    new = sparsegpt_prune([m.weight.data], [st], **args, blocksize=int(p["blocksize"]),
                                          percdamp=float(p["percdamp"]))
                m.weight.data.copy_(new)
                out[w] = st.float().cpu().contiguous()
            caught = [(*_advance(a, kw, layer(*a, **kw)), k) for a, kw, k in caught]
        if log:
            log(f"layer {li + 1}/{len(layers)} pruned")
    return out


def _advance(args: tuple, kwargs: dict, out) -> tuple[tuple, dict]:
    """The next layer's inputs: this layer's hidden-state output in place of its own
    (passed positionally, or as hidden_states=), the other arguments unchanged."""
    h = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}
