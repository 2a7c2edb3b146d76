"""How an ensemble combines its members' outputs (fusionlang.eval.ensembles): a plain
function over tensors, not a plan op (ensembles have no merged weights)."""

from __future__ import annotations


def combine(outputs: list, weights: list[float] | None, normalize: bool, mode: str):
    """The members' outputs (n tensors of one shape, e.g. [batch, classes] logits) combined
    in float32: `mode="mean"` without weights, their mean (FusionBench EnsembleModule);
    with weights w, Σ_i w_i y_i, w divided by Σ w when `normalize`
    (WeightedEnsembleModule); `mode="max"`, the elementwise max (MaxModelPredictor)."""
    import torch

    stack = torch.stack([o.float() for o in outputs])
    if mode == "max":
        return stack.max(dim=0).values
    if weights is None:
        return stack.mean(dim=0)
    w = torch.tensor(weights, dtype=torch.float32, device=stack.device)
    if normalize:
        w = w / w.sum()
    return (stack * w.view(-1, *([1] * (stack.dim() - 1)))).sum(dim=0)
