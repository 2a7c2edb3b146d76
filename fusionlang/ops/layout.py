"""Layout primitives: tensors of an output whose architecture differs from its inputs'
(mixture-of-experts layers built from dense models)."""

from __future__ import annotations

from .registry import Tensor, op, torch


@op(public=False)
def stack_experts(xs: list[Tensor], parts: int = 1) -> Tensor:
    """E experts' tensors as one [E, rows, cols] tensor: `xs` holds `parts` tensors per
    expert, expert by expert (e.g. gate then up projection, each [I, H]); each expert's
    parts are concatenated along rows ([parts·I, H]) and the experts stacked on a new
    first axis. transformers 5.x `MixtralExperts.gate_up_proj` / `down_proj` (its forward
    splits gate_up into gate, up with `chunk(2, dim=-1)`). Raises ValueError when the
    count is not a multiple of `parts`."""
    if parts < 1 or len(xs) % parts:
        raise ValueError(f"{len(xs)} tensors cannot be grouped by {parts}")
    rows = sum(x.shape[0] for x in xs[:parts])
    out = torch.empty((len(xs) // parts, rows, *xs[0].shape[1:]), dtype=xs[0].dtype, device=xs[0].device)
    for j in range(len(xs) // parts):  # one copy of each part into place (no cat, then stack)
        r = 0
        for x in xs[j * parts:(j + 1) * parts]:
            out[j, r:r + x.shape[0]].copy_(x)
            r += x.shape[0]
    return out


@op(public=False)
def gaussian_noise(x: Tensor, scale: float = 0.0, seed: int = 0) -> Tensor:
    """x + scale · ε, ε ~ N(0, 1) elementwise (float32), drawn from a generator seeded
    with `seed` (the plan derives it per output tensor, so a run is reproducible and
    independent of execution order). mergekit-moe's `noise_scale` (which draws from the
    global, unseeded generator)."""
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device)
    return (x.float() + float(scale) * eps).to(x.dtype)


@op(public=False)
def zeros(shape: list[float]) -> Tensor:
    """A float32 tensor of zeros of `shape` (whole numbers): a tensor the output's class
    has and no input does, e.g. the q/k/v biases of a Qwen2-MoE built from Llama models
    (mergekit-moe writes zeros too, so the biases change nothing)."""
    return torch.zeros([int(d) for d in shape], dtype=torch.float32)


@op(public=False)
def vocab_rows(xs: list[Tensor], which: int = 0, spec: str = "{}") -> Tensor:
    """Model `which`'s token-indexed tensor (embedding, LM head) with its rows in the
    output vocabulary's order, [output vocab size, ...]; `xs` holds every model's tensor
    (a token one model lacks takes a default row from the others) and `spec` the
    vocabulary (JSON: model directories, base, tokenizer source, padding). MergeKit 0.1.5
    `PermutedVocabulary` (arch/vocab.py has the rules)."""
    from ..arch.vocab import realign

    return realign(xs, which, spec)
