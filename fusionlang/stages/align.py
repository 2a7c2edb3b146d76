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


def missing_packages(method: str, target: str) -> list[str]:
    """The Python packages (POT, scipy) an alignment needs and cannot import."""
    import importlib.util

    need = ["scipy"]
    if method != "weight" or target != "align":
        need.append("ot")
    return [{"ot": "POT"}.get(m, m) for m in need if importlib.util.find_spec(m) is None]


def read_state(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's *.safetensors files (CPU, as stored)."""
    from pathlib import Path

    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def model_activations(model_dir: str, data: dict, ex, spec: PermSpec, p: dict, device) -> dict[str, torch.Tensor]:
    """`activations` of the model in `model_dir` on the rows `ex` of data value `data`,
    run as stages run it (`stages.models.build`); `p`: batch_size, max_samples, seed."""
    from . import models as M

    sm = M.build(model_dir, data, device)
    module_of = {}
    for mod_name, file_name in sm.names.items():  # the files' layer path -> the module's
        if file_name.endswith(".weight") and mod_name.endswith(".weight"):
            module_of[file_name[: -len(".weight")]] = mod_name[: -len(".weight")]
    bs = int(p["batch_size"])
    batches = (sm.inputs(ex, s, min(len(ex), s + bs)) for s in range(0, len(ex), bs))
    return activations(sm.module, spec, batches, sm.run, module_of, int(p["max_samples"]), int(p["seed"]))


def compute(stage: dict, device, log=None) -> dict[str, torch.Tensor]:
    """Run an "align" stage (model_dirs [reference, model]: the model aligned to the
    reference) or a "barycenter" stage (model_dirs: the models, fused); returns every
    tensor of the result in the input's dtype, on the CPU."""
    from ..arch.permutation import derive
    from . import data as D
    from . import models as M

    p = stage["params"]
    states = [read_state(d) for d in stage["model_dirs"]]
    config = M.read_config(stage["model_dirs"][0])
    spec = derive(config, {k: tuple(v.shape) for k, v in states[0].items()},
                  tuple(p["axes"]) if p.get("axes") is not None else None)
    acts = None
    if stage["data"]:
        data = stage["data"][0]
        ex = D.load(data)
        try:
            acts = [model_activations(d, data, ex, spec, p, device) for d in stage["model_dirs"]]
        except KeyError as e:  # the module run on this data lacks a layer the files have (e.g. a head)
            raise D.DataError("E014", f"cannot take activations: {e.args[0]}",
                              "align from weights (leave data= out), or use data the whole model runs on") from None
        if log:
            log(f"activations of {len(spec.perms)} sets of units on {len(ex)} rows")
    if stage["kind"] == "align":
        aligned, maps = align_states(spec, states[0], states[1], p["method"], acts[0] if acts else None,
                                     acts[1] if acts else None, p["reg"], p["soft"], p["max_iter"], p["seed"])
        if log:
            moved = sum(int((m != torch.arange(len(m))).sum()) for m in maps.values() if m.dtype == torch.int64)
            log(f"{p['method']}: {len(maps)} permutations, {moved} units moved")
        return aligned
    fused, _maps = X.barycenter(spec, states, p.get("weights"), acts, p["method"], p["reg"], p["soft"],
                                p["max_iter"])
    if p.get("reset_bn") and stage["data"]:
        n_bn = reset_bn(stage["model_dirs"][0], stage["data"][0], ex, fused, int(p["batch_size"]), device)
        if log:
            log(f"BatchNorm statistics of {n_bn} layers re-estimated on {len(ex)} rows")
    return {k: (fused[k].to(v.dtype) if k in fused else v) for k, v in states[0].items()}


def reset_bn(model_dir: str, data: dict, ex, state: dict[str, torch.Tensor], batch_size: int, device) -> int:
    """Re-estimate, in place in `state` (file tensor names), the running mean and variance
    of every BatchNorm layer of the model `state` describes: exact averages over the
    batches of `ex` with the layers in training mode and everything else in eval mode
    (Git Re-Basin's "reset BN" after interpolating; FusionBench has none). Returns the
    number of BatchNorm layers (0: nothing to do)."""
    from . import models as M

    sm = M.build(model_dir, data, device)
    bns = [(n, m) for n, m in sm.module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    file_of = dict(sm.names)
    with torch.no_grad():
        own = dict(sm.module.named_parameters()) | dict(sm.module.named_buffers())
        for mod_name, file_name in file_of.items():
            if mod_name in own and file_name in state:
                own[mod_name].copy_(state[file_name].to(own[mod_name].dtype))
        for _n, m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        for s in range(0, len(ex), batch_size):
            sm.run(sm.inputs(ex, s, min(len(ex), s + batch_size)))
        for n, m in bns:
            for k in ("running_mean", "running_var"):
                f = file_of.get(f"{n}.{k}")
                if f is not None and f in state:
                    state[f] = getattr(m, k).detach().float().cpu().clone()
    return len(bns)
