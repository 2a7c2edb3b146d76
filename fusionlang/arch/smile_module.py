"""The torch module of a SMILE Linear layer (layout and formula: `arch.smile`). Imports
torch: loaded only when a SMILE model is built."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SmileLinear(torch.nn.Module):
    """A SMILE Linear layer (see the module docstring): the pretrained Linear plus E
    low-rank experts of its task vectors, routed per token by the norms of the inputs'
    projections on each expert's leading right singular vectors. `weight` / `bias` are
    the pretrained layer's (so code that reads `layer.weight.dtype` keeps working).

    Shapes: gate [E, gate_k, in], u [E, out, k], svh [E, k, in], bias [E, out] or None;
    forward: x [..., in] -> [..., out]. Follows FusionBench 0.2.33 `SmileMoELinear.forward`
    (softmax over all experts, top-k, renormalised; experts computed on their tokens only)."""

    def __init__(self, base, gate, u, svh, bias, top_k: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.top_k = int(u.shape[0]), int(top_k)
        self.weight = base.weight
        self.bias = base.bias
        self.smile_gate = torch.nn.Parameter(gate, requires_grad=False)
        self.smile_u = torch.nn.Parameter(u, requires_grad=False)
        self.smile_svh = torch.nn.Parameter(svh, requires_grad=False)
        self.smile_bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        h = x.reshape(-1, self.in_features)
        e, g = self.smile_gate.shape[:2]
        logits = F.linear(h, self.smile_gate.reshape(e * g, -1)).view(-1, e, g).norm(p=2, dim=2)
        p = F.softmax(logits, dim=1)
        p, chosen = torch.topk(p, self.top_k, dim=-1)
        p = p / p.sum(dim=-1, keepdim=True)
        mix = torch.zeros((h.shape[0], self.out_features), dtype=h.dtype, device=h.device)
        for j in range(e):
            rows, slot = torch.where(chosen == j)
            if rows.numel() == 0:
                continue
            y = F.linear(F.linear(h[rows], self.smile_svh[j]), self.smile_u[j],
                         self.smile_bias[j] if self.smile_bias is not None else None)
            mix.index_add_(0, rows, (y * p[rows, slot, None]).to(h.dtype))
        return out + mix.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, k={self.smile_u.shape[2]}, gate_k={self.smile_gate.shape[1]}")
