"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning"): task-arithmetic coefficients learned at test time by minimising the entropy
of the merged model's predictions on unlabeled inputs.

The merged model is θ = θ₀ + Σ_i λ_i ⊙ τ_i (τ_i = θ_i − θ₀). `mode="task"`: one λ_i per
model; `mode="layer"`: one λ per (model, parameter tensor), FusionBench's "layer-wise"
(its LayerWiseMergedModel has a weight per named parameter). Every λ starts at `init`.
Each step, for every model i in order: the next batch of `batch_size` rows of data value
i, the merged model's logits on it (with data i's head: task i's frozen head for zoo
data, the merged model's own head otherwise), the entropy −Σ_c p log(p + 1e-8) averaged
over the batch, backward (gradients add up over the models); then one Adam step
(`lr`, torch defaults otherwise). `clamp` clips λ to [0, 1] where it is used. FusionBench
`clip_task_wise_adamerging` / `clip_layer_wise_adamerging` (init_values 0.3, lr 1e-3,
batch_size 16, max_steps 1000, clamp_weights false).

Batches: data value i's rows in the order of a permutation drawn from
`torch.Generator().manual_seed(seed * 1_000_003 + i)` (a new permutation per epoch from
the same generator), cut into consecutive batches (the last of an epoch may be short),
as a shuffled DataLoader does. The model runs in eval mode (dropout off), in float32.

The stage's result: for every tensor of the base model's files, the vector [n] of the
coefficients that tensor's task vectors get (a tensor the merged module does not hold as
a parameter, e.g. a buffer, keeps `init` in layer mode).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from . import data as D
from . import models as M


def batch_order(n_rows: int, batch_size: int, seed: int, i: int):
    """The endless stream of row-index batches data value `i` feeds (see the module docstring)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    while True:
        perm = torch.randperm(n_rows, generator=g).tolist()
        for start in range(0, n_rows, batch_size):
            yield perm[start:start + batch_size]


def entropy(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over the batch of the prediction entropy −Σ_c p_c log(p_c + eps)."""
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p + eps)).sum(-1).mean()


def learn(stage: dict, device, log: Callable[[str], None] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Run AdaMerging; returns (λ [n] or [n, P], the P module parameter names of layer
    mode, as tensor names of the files)."""
    from safetensors.torch import load_file

    p = stage["params"]
    datas = stage["data"]
    exs = [D.load(d) for d in datas]
    base = M.build(stage["model_dir"], datas[0], device)
    sms = [base] + [M.build(stage["model_dir"], d, device, module=base.module) for d in datas[1:]]
    for sm in sms:
        if sm.logits is None:
            raise D.DataError("E014", "AdaMerging needs the model's predictions, and this model has no classification "
                              "head", "use models saved with their head, or data of zoo tasks")
    module = base.module
    for q in module.parameters():
        q.requires_grad_(False)
    names = [n for n, _ in module.named_parameters() if n in base.names]
    theta0 = dict(module.named_parameters())
    tvs = []
    for d in stage["model_dirs"]:
        files = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            files.update(load_file(str(f), device="cpu"))
        tvs.append({n: files[base.names[n]].to(device=device, dtype=torch.float32) - theta0[n].detach()
                    for n in names})
    n = len(tvs)
    # NOTE: one [n, *shape] stack per tensor: the merge is then two ops per tensor, not 2n
    # tiny ones (layer mode has n × tensors coefficients; the autograd graph stays small)
    stacks = {name: torch.stack([tv[name] for tv in tvs]) for name in names}
    del tvs
    init = float(p["init"])
    lam = torch.full((n,) if p["mode"] == "task" else (n, len(names)), init, dtype=torch.float32, device=device,
                     requires_grad=True)
    opt = torch.optim.Adam([lam], lr=float(p["lr"]))
    wrappers = [M.Bound(sm.module, sm.logits) for sm in sms]
    streams = [batch_order(len(ex), int(p["batch_size"]), int(p["seed"]), i) for i, ex in enumerate(exs)]
    steps = int(p["steps"])
    for step in range(steps):
        w = lam.clamp(0, 1) if p["clamp"] else lam
        merged = {}
        for j, name in enumerate(names):
            s = stacks[name]
            coef = (w if w.dim() == 1 else w[:, j]).view(n, *([1] * (s.dim() - 1)))
            merged["inner." + name] = theta0[name].detach() + (coef * s).sum(0)
        total = 0.0
        for i, (ex, wrap) in enumerate(zip(exs, wrappers)):
            idx = next(streams[i])
            batch = sms[i].inputs(_rows(ex, idx), 0, len(idx))
            loss = entropy(torch.func.functional_call(wrap, merged, (batch,)))
            loss.backward(retain_graph=i < n - 1)
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        if log and (step + 1 == steps or (step + 1) % max(1, steps // 10) == 0):
            log(f"step {step + 1}/{steps}: entropy {total / n:.4f}")
    final = (lam.clamp(0, 1) if p["clamp"] else lam).detach().cpu()
    return final, [base.names[x] for x in names]


def _rows(ex: D.Examples, idx: list[int]) -> D.Examples:
    if ex.texts is not None:
        return D.Examples(tuple(ex.texts[k] for k in idx), None, None, "")
    images = ex.images[idx] if hasattr(ex.images, "shape") else [ex.images[k] for k in idx]
    return D.Examples(None, images, None, "")


def result(stage: dict, lam: torch.Tensor, names: list[str], all_names: list[str]) -> dict[str, torch.Tensor]:
    """The stage's tensors: every file tensor name -> its coefficient vector [n]."""
    n = lam.shape[0]
    if lam.dim() == 1:
        return {t: lam.clone() for t in all_names}
    col = {t: j for j, t in enumerate(names)}
    init = torch.full((n,), float(stage["params"]["init"]))
    return {t: (lam[:, col[t]].clone() if t in col else init.clone()) for t in all_names}
