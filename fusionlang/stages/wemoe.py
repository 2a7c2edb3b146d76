"""WEMoE's routers, trained at test time (Tang et al., ICML 2024; FusionBench 0.2.33
`WeightEnsemblingMoEAlgorithm.test_time_adaptation`, `clip_weight_ensembling_moe`).

The model: the base with every tensor outside the MLPs set to task arithmetic
θ₀ + λ·Σᵢ τᵢ (λ = `init_lambda`) and each MLP's Linear layers made `WELinear`s over the
experts' task vectors (`arch.wemoe`, `arch.wemoe_module`), one router per MLP initialised
as FusionBench does (weights N(0, 0.01²), output bias λ; drawn from a generator seeded
with `seed`, layer by layer in the files' order). Only the routers train: each step,
for every expert i in order, the next batch of `batch_size` rows of data value i (the
row order of `adamerging.batch_order`), the entropy of the model's predictions with data
i's head, backward (gradients add up over the experts, FusionBench's
use_grad_accumulate); then one Adam step (`lr`). With `batch_reduce` (FusionBench's
default while training) the routing weights are averaged over the batch. The model runs
in eval mode (dropout off), in float32.

The result: the routers' tensors, under the names the output gives them
(`<first MLP Linear>.wemoe_router.*`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from . import data as D
from . import models as M
from .adamerging import _rows, batch_order, entropy


def train(stage: dict, device, log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Train the routers of a WEMoE model; returns {router tensor name: float32 CPU tensor}.
    Raises DataError (E014) when the model has no classification head for the data."""
    from safetensors.torch import load_file

    from ..arch.wemoe_module import Router, WELinear, capture_mask, routing_state

    p = stage["params"]
    datas = stage["data"]
    exs = [D.load(d) for d in datas]
    base = M.build(stage["model_dir"], datas[0], device)
    sms = [base] + [M.build(stage["model_dir"], d, device, module=base.module) for d in datas[1:]]
    if any(sm.logits is None for sm in sms):
        raise D.DataError("E014", "WEMoE trains its routers on the model's predictions, and this model has no "
                          "classification head", "use models saved with their head, or data of zoo tasks")
    module = base.module
    for q in module.parameters():
        q.requires_grad_(False)
    groups: dict[str, list[str]] = p["groups"]
    members = {m for ms in groups.values() for m in ms}
    module_of = {f: n for n, f in base.names.items()}  # file tensor name -> module parameter name
    theta0 = {n: q.detach().clone() for n, q in module.named_parameters() if n in base.names}
    lam = float(p["init_lambda"])
    tv_lists: dict[str, list[torch.Tensor]] = {}
    ta_sum: dict[str, torch.Tensor] = {}
    for d in stage["model_dirs"]:
        files = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            files.update(load_file(str(f), device="cpu"))
        for n, t0 in theta0.items():
            fname = base.names[n]
            tv = files[fname].to(device=device, dtype=torch.float32) - t0
            if fname.rsplit(".", 1)[0] in members:
                tv_lists.setdefault(fname, []).append(tv)
            else:
                ta_sum[n] = ta_sum[n] + tv if n in ta_sum else tv
        del files
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, s in ta_sum.items():  # task arithmetic outside the MLPs
            params[n].add_(lam * s)
    del ta_sum
    shared: dict = {}
    g = torch.Generator().manual_seed(int(p["seed"]))
    depth = int(p["router_hidden_layers"])
    routers: dict[str, Router] = {}
    linears: list[WELinear] = []
    for layer, ms in groups.items():
        for j, m in enumerate(ms):
            path = module_of[f"{m}.weight"].rsplit(".", 1)[0]
            lin = module.get_submodule(path)
            router = None
            if j == 0:
                router = Router(lin.in_features, len(stage["model_dirs"]), depth).to(device)
                router.init(lam, g)
                routers[m] = router
            tvb = torch.stack(tv_lists.pop(f"{m}.bias")) if f"{m}.bias" in tv_lists else None
            we = WELinear(lin, torch.stack(tv_lists.pop(f"{m}.weight")), tvb, routing_state(shared, layer), router)
            we.batch_reduce = bool(p["batch_reduce"])
            parent, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, we)
            linears.append(we)
    capture_mask(module, shared)
    trainable = [q for r in routers.values() for q in r.parameters()]
    opt = torch.optim.Adam(trainable, lr=float(p["lr"]))
    streams = [batch_order(len(ex), int(p["batch_size"]), int(p["seed"]), i) for i, ex in enumerate(exs)]
    steps = int(p["steps"])
    for step in range(steps):
        total = 0.0
        for i, (ex, sm) in enumerate(zip(exs, sms)):
            idx = next(streams[i])
            batch = sm.inputs(_rows(ex, idx), 0, len(idx))
            loss = entropy(sm.logits(batch))
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        if log and (step + 1 == steps or (step + 1) % max(1, steps // 10) == 0):
            log(f"step {step + 1}/{steps}: entropy {total / len(exs):.4f}")
    return {f"{m}.wemoe_router.{k}": v.detach().float().cpu().clone() for m, r in routers.items()
            for k, v in r.state_dict().items()}
