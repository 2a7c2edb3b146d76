"""Alignment as a model stage: aligned copies of models (`align(model, to=ref, ...)`) and
fused models (`wasserstein_barycenter(models, ...)`), from the permutation spec
(`arch.permutation`) and the mathematics of `stages.matching`.

Activations (OT fusion's "acts" mode) are the inputs of each permutation's consumer
layer (the next Linear / Conv2d, whose input axis the units are), taken on the same rows
of a data value for every model, in float32, the module in eval mode. At most
`max_samples` positions per unit are kept (a seeded draw, the same for every model), so a
CNN's H·W positions per image stay within memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..arch.permutation import PermSpec
from . import matching as X


def _unit_acts(x: torch.Tensor, kind: str, repeats: int, size: int, unit: int) -> torch.Tensor:
    """A consumer layer's input batch as [size, positions]."""
    if kind == "conv":  # [B, C, H, W]: channels on axis 1
        x = x.movedim(1, -1)
    x = x.reshape(-1, repeats, size, unit)  # positions × the axis
    return x.permute(2, 0, 1, 3).reshape(size, -1)


def activations(module: torch.nn.Module, spec: PermSpec, batches: Iterable, forward: Callable,
                module_of: dict[str, str] | None = None, max_samples: int = 20000,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """{perm name: float32 [size, samples]}: each permutation's units' activations, the
    inputs of its consumer layer, over `forward(batch)` for every batch. `module_of`
    maps a consumer path in the files' names to the module's submodule path (identity when
    None). Raises KeyError naming a consumer the module does not have."""
    names = dict(module.named_modules())
    got: dict[str, list[torch.Tensor]] = {p.name: [] for p in spec.perms}
    hooks = []
    for p in spec.perms:
        path, kind, repeats, unit = p.consumer
        path = (module_of or {}).get(path, path)
        if path not in names:
            raise KeyError(f"layer '{path}' (the input of units '{p.name}') is not in the model")

        def hook(_mod, inputs, p=p, kind=kind, repeats=repeats, unit=unit):
            got[p.name].append(_unit_acts(inputs[0].detach().float(), kind, repeats, p.size, unit).cpu())

        hooks.append(names[path].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                forward(b)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    g = torch.Generator().manual_seed(int(seed))
    for k, parts in got.items():
        a = torch.cat(parts, 1)
        if a.shape[1] > max_samples:
            a = a[:, torch.randperm(a.shape[1], generator=g)[:max_samples].sort().values]
        out[k] = a
    return out


def align_states(spec: PermSpec, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], method: str = "weight",
                 acts_ref=None, acts_other=None, reg: float = 0.01, soft: bool = False, max_iter: int = 100,
                 seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, X.Map]]:
    """`other` aligned to `ref`: (its tensors with the maps applied, in their dtypes; the
    maps). `method`: "weight" (Git Re-Basin weight matching), "emd" or "sinkhorn" (OT
    fusion's maps, from activations when both are given, else from weights)."""
    if method == "weight":
        maps = X.weight_matching(spec, ref, other, max_iter=max_iter, seed=seed)
    else:
        maps = X.transport_maps(spec, ref, other, acts_ref, acts_other, solver=method, reg=reg, soft=soft)
    floats = {k: v.double() for k, v in other.items() if v.is_floating_point()}
    aligned = X.apply_maps(spec, floats, maps)
    return {k: (aligned[k].to(v.dtype) if k in aligned else v) for k, v in other.items()}, maps
