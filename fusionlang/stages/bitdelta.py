"""The BitDelta stage (Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One
Bit"): a fine-tune's weight deltas compressed to their signs times one scale per matrix,
the scales (and, as FusionBench, every other parameter) calibrated by distillation.

For every Linear weight inside the numbered layer stack, Δ = W_ft − W_base becomes
s · sign(Δ) (sign +1 where Δ >= 0, −1 elsewhere), s initialised to mean|Δ|. The
compressed model (biases, embeddings, norms and head from the fine-tune) is then trained
for `num_steps` steps of AdamW (torch defaults, cosine-annealed learning rate from `lr`)
to minimise the mean squared error between its logits and the fine-tune's, on batches
of `batch_size` rows of `data` in order (cycled when the data has fewer rows than
num_steps · batch_size), each padded to `max_length` tokens, padding included in the loss.
`calibrate="all"` trains every parameter (FusionBench); "scales" only the scales (the
paper's calibration).

Results: per compressed weight its scale s (shape [1]); with calibrate="all" every other
trained parameter's value. The stdlib's `bitdelta` writes base + s · sign(model − base).

FusionBench 0.2.33 `BitDeltaAlgorithm` (lr 1e-4, batch_size 4, num_steps 100,
max_length 128; compress_diff, BinaryDiff, its training loop), with two differences,
both documented: its `BinaryDiff` (the compressed Linear) drops the Linear's bias (Qwen2's
q/k/v biases are lost; here they are kept and trained), and its CUDA-only triton kernel
rounds x · sign(Δ)ᵀ to float16 and passes no gradient to the layer input; here the
product is exact float32 and differentiable. Two models resident (the fine-tune for the
targets, the compressed one with the base weights and signs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import data as D
from .pruning import stack_linears


class SignDelta(torch.nn.Module):
    """A Linear with weight base + scale · sign: y = x Wᵀ_base + scale · x signᵀ + bias.
    `base`, `sign` [out, in] buffers; `scale` a [1] parameter; `bias` the Linear's own."""

    def __init__(self, base: torch.Tensor, sign: torch.Tensor, scale: float, bias: torch.nn.Parameter | None):
        super().__init__()
        self.register_buffer("base", base)
        self.register_buffer("sign", sign)
        self.scale = torch.nn.Parameter(torch.tensor([scale], dtype=torch.float32, device=base.device))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base) + self.scale * F.linear(x, self.sign)
        return y + self.bias if self.bias is not None else y


def _load(model_dir: str, device):
    from ..zoo.text import _quiet_transformers

    _quiet_transformers()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                              dtype=torch.float32).to(device).eval()
    return model


def train(stage: dict, device, log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Compress and calibrate (module docstring). Returns file tensor name -> float32 CPU
    tensor: a [1] scale per compressed weight, and with calibrate="all" every other
    trained parameter."""
    import transformers

    p = stage["params"]
    ex = D.load(stage["data"])
    if ex.texts is None:
        raise D.DataError("E014", "bitdelta() calibrates on text, and this data has none", "give text= data")
    base = _load(stage["model_dirs"][0], device)
    ft = _load(stage["model_dir"], device)
    comp = _load(stage["model_dir"], device)
    tok = transformers.AutoTokenizer.from_pretrained(stage["model_dir"], local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base_state = dict(base.named_parameters())
    names = [w[: -len(".weight")] for w in stack_linears(comp)]
    with torch.no_grad():
        for n in names:
            lin = comp.get_submodule(n)
            delta = lin.weight - base_state[f"{n}.weight"]
            sign = torch.where(delta >= 0, 1.0, -1.0)
            parent, _, child = n.rpartition(".")
            setattr(comp.get_submodule(parent) if parent else comp, child,
                    SignDelta(base_state[f"{n}.weight"].detach().clone(), sign, float(delta.abs().mean()), lin.bias))
    del base, base_state
    for q, prm in comp.named_parameters():
        prm.requires_grad_(p["calibrate"] == "all" or q.endswith(".scale"))
    params = [prm for prm in comp.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(params, lr=p["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p["num_steps"])
    bs, steps = p["batch_size"], p["num_steps"]
    texts = list(ex.texts)
    every = max(1, steps // 10)
    for step in range(steps):
        rows = [texts[(step * bs + k) % len(texts)] for k in range(bs)]
        batch = tok(rows, padding="max_length", truncation=True, max_length=p["max_length"], return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            target = ft(**batch).logits
        loss = F.mse_loss(target, comp(**batch).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise D.DataError("E006", f"bitdelta's calibration loss became {loss.item()} at step {step + 1}",
                              "lower lr")
        if log and ((step + 1) % every == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps}: logit MSE {loss.item():.3g}")
    out: dict[str, torch.Tensor] = {}
    files = set(stage["tensors"])
    for q, prm in comp.named_parameters():
        if q.endswith(".scale"):
            w = q[: -len(".scale")] + ".weight"
            out[w] = prm.detach().float().cpu().reshape(1).contiguous()
        elif p["calibrate"] == "all" and q in files:
            out[q] = prm.detach().float().cpu().contiguous()
    return out
