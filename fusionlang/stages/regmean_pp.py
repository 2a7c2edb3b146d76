"""RegMean++ (Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging"): RegMean whose Gram matrices for layer l are taken on
the inputs the *merged* layers below l produce.

Layer by layer (the model's stack of numbered layers, e.g. `encoder.layer.{l}` or
`_blocks.{l}`): for each model i, the model is run on its data value with the merged
tensors below layer l (the tensors before the stack, such as embeddings, averaged; layers
< l merged) and its own tensors from layer l on, and the Gram matrix of every Linear /
Conv2d input inside layer l is taken (statistics.gram's definition). Layer l is then
merged (RegMean's closed form, `ops.stat_weighted.regmean_solve`, for those weights; the
mean for its other tensors) before layer l + 1 is measured. The stage's results are the
Gram matrices of every model (the stdlib's `regmean_plusplus` solves them per tensor as
RegMean does); tensors outside the layer stack have none (the stdlib averages them).

FusionBench `RegMeanAlgorithmPlusPlus` (its CLIP version): the same per-layer procedure,
embeddings averaged first. It keeps the *pre-trained* values for the tensors after the
stack (CLIP's post-layernorm); this stage's stdlib method averages them: write a rule
(`"*post_layernorm*" => base`) to match it exactly. Every model's weights are resident
(n models), and each layer costs one forward pass per model over its data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from .. import arch
from . import data as D
from . import models as M
from .statistics import covered_shapes, gram

_BLOCKS = re.compile(r"^(?P<prefix>(?:.*\.)?_blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")


def layer_index(name: str) -> tuple[str, int] | None:
    """(stack prefix, layer index) of a tensor name inside a numbered layer stack."""
    s = arch.split_layer(name)
    if s:
        return s[0], s[1]
    m = _BLOCKS.match(name)
    return (m.group("prefix"), int(m.group("index"))) if m else None


def covered(sm: M.StageModel) -> dict[str, tuple[int, ...]]:
    """The Gram shapes of the weights inside the layer stack (compile time)."""
    return {t: s for t, s in covered_shapes("gram", sm).items() if layer_index(t) is not None}


def grams(stage: dict, device, log: Callable[[str], None] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every model's Gram matrices (file tensor name -> float32 CPU tensor), measured on the
    inputs the merged lower layers produce (module docstring)."""
    from ..ops.stat_weighted import regmean_solve

    p = stage["params"]
    alpha, bs = float(p["alpha"]), int(p["batch_size"])
    include_padding = bool(p.get("include_padding", True))  # plans saved before the parameter counted padding
    datas = stage["data"]
    exs = [D.load(d) for d in datas]
    base = M.build(stage["model_dirs"][0], datas[0], device)
    sms = [base] + [M.build(stage["model_dirs"][0], d, device, module=base.module) for d in datas[1:]]
    module = base.module
    # every state entry of the module (parameters and buffers) by its name in the files
    names = M.name_map(module, set(_files(stage["model_dirs"][0]).keys()), buffers=True)
    states = [{k: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
               for k, v in _files(d).items()} for d in stage["model_dirs"]]
    n = len(states)
    stacks = {layer_index(f)[0] for f in names.values() if layer_index(f)}
    if len(stacks) != 1:
        raise D.DataError("E014", f"RegMean++ needs one stack of numbered layers; the model has "
                          f"{len(stacks)} ({', '.join(sorted(stacks)) or 'none'})", "use regmean() for this model")
    layers = 1 + max(layer_index(f)[1] for f in names.values() if layer_index(f))
    shapes = covered(base)
    merged: dict[str, torch.Tensor] = {}
    for f in names.values():  # the tensors before the stack (in module order): averaged first
        if layer_index(f) is not None:
            break
        if states[0][f].is_floating_point():
            merged[f] = sum(s[f] for s in states) / n
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for layer in range(layers):
        here = {t for t in shapes if layer_index(t)[1] == layer}
        for i in range(n):
            params = {}
            for mod_name, f in names.items():
                li = layer_index(f)
                use_merged = f in merged and (li is None or li[1] < layer)
                params["inner." + mod_name] = merged[f] if use_merged else states[i][f]
            bound = M.Bound(module, sms[i].run)
            sub = M.StageModel(module, {k: v for k, v in base.names.items() if v in here}, sms[i].inputs,
                               lambda batch, bound=bound, params=params: torch.func.functional_call(
                                   bound, params, (batch,)), None, sms[i].lengths)
            g = gram(sub, exs[i], bs, include_padding=include_padding)
            out[i].update(g)
        for f in names.values():  # merge layer `layer` before measuring the next one
            li = layer_index(f)
            if li is None or li[1] != layer or not states[0][f].is_floating_point():
                continue
            if f in here:
                merged[f] = regmean_solve([s[f] for s in states], [out[i][f].to(device) for i in range(n)], alpha)
            else:
                merged[f] = sum(s[f] for s in states) / n
        if log:
            log(f"layer {layer + 1}/{layers} merged")
    return [{k: v.float().cpu().contiguous() for k, v in o.items()} for o in out]


def _files(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state
