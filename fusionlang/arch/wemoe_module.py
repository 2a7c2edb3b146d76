"""The torch modules of a WEMoE model (layout and formula: `arch.wemoe`): the router,
the MLP Linear layers whose weights are the base's plus routed task vectors, and the
routing state one MLP's layers share. Imports torch: loaded only when a WEMoE model is
built (by `fusionlang.load`, `eval`, or the router-training stage)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of per-sample weight matrices built at once (256 MB in float32).
PER_SAMPLE_ELEMENTS = 1 << 26


class RoutingState:
    """What one MLP's Linear layers share during a forward pass: the routing weights the
    first layer computed ([B, E] per sample, or [E] for the whole batch), and the
    model-wide inputs (`inputs["attention_mask"]`: [B, T], set by `capture_mask`)."""

    def __init__(self, inputs: dict) -> None:
        self.weights: torch.Tensor | None = None
        self.inputs = inputs


def routing_state(shared: dict, group: str) -> RoutingState:
    """The routing state of MLP `group`, created in `shared` on first use (with the
    model-wide inputs dict under the key "" )."""
    inputs = shared.setdefault("", {})
    if group not in shared:
        shared[group] = RoutingState(inputs)
    return shared[group]


def capture_mask(model: torch.nn.Module, shared: dict) -> None:
    """Make `model` remember the attention mask of each call (a keyword argument) for its
    WEMoE routers, so that padding does not count in their mean over tokens."""
    inputs = shared.setdefault("", {})

    def hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        inputs["attention_mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    model.register_forward_pre_hook(hook, with_kwargs=True)


class Router(torch.nn.Module):
    """FusionBench's weight-ensembling gate: depth 0 a learned vector [E]; depth 1 a
    Linear hidden → E; depth 2 Linear hidden → hidden, ReLU, Linear hidden → E. Input
    [..., hidden], output [..., E] (depth 0: [E])."""

    def __init__(self, hidden: int, n: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.weight = torch.nn.Parameter(torch.empty(n))
        elif depth == 1:
            self.fc = torch.nn.Linear(hidden, n)
        elif depth == 2:
            self.fc1 = torch.nn.Linear(hidden, hidden)
            self.fc2 = torch.nn.Linear(hidden, n)
        else:
            raise ValueError(f"router_hidden_layers={depth}: 0, 1 or 2")

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], depth: int) -> Router:
        """A router holding `tensors` (names as `arch.wemoe.router_tensors`, without the
        layer prefix). Raises ValueError for missing tensors."""
        if depth == 0:
            r = cls(1, tensors["weight"].shape[0], 0)
        else:
            last = tensors["fc.weight" if depth == 1 else "fc2.weight"]
            r = cls(last.shape[1], last.shape[0], depth)
        r.load_state_dict(tensors, strict=True)
        return r

    def init(self, init_lambda: float, generator: torch.Generator) -> None:
        """FusionBench's initialisation: weights N(0, 0.01²), hidden bias 0, output bias
        init_lambda (so every expert starts at weight init_lambda: task arithmetic);
        drawn from `generator`."""
        with torch.no_grad():
            if self.depth == 0:
                self.weight.fill_(init_lambda)
                return
            last = self.fc if self.depth == 1 else self.fc2
            if self.depth == 2:
                self.fc1.weight.copy_(torch.randn(self.fc1.weight.shape, generator=generator) * 0.01)
                self.fc1.bias.zero_()
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.01)
            last.bias.fill_(init_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return self.weight
        if self.depth == 1:
            return self.fc(x)
        return self.fc2(F.relu(self.fc1(x)))


class WELinear(torch.nn.Module):
    """A Linear layer of a WEMoE MLP: y = x·(W₀ + Σᵢ wᵢ τᵢ)ᵀ + (b₀ + Σᵢ wᵢ τbᵢ) with w the
    routing weights of the input's sample. The MLP's first layer (`router` given)
    computes w from its input x [B, T, in]: the router's outputs averaged over the
    tokens (real tokens only when the model was called with an attention mask), then
    over the batch when `batch_reduce` (router training, as FusionBench); the other
    layers take it from the shared `state`. `weight` / `bias` are the base's.
    Shapes: tv_weight [E, out, in], tv_bias [E, out] or None."""

    def __init__(self, base: torch.nn.Linear, tv_weight: torch.Tensor, tv_bias: torch.Tensor | None,
                 state: RoutingState, router: Router | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.wemoe_tv_weight = torch.nn.Parameter(tv_weight, requires_grad=False)
        self.wemoe_tv_bias = torch.nn.Parameter(tv_bias, requires_grad=False) if tv_bias is not None else None
        self.wemoe_router = router
        self.state = state
        self.batch_reduce = False

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The routing weights for input x: [E] (depth-0 router, or batch_reduce) or [B, E]."""
        g = self.wemoe_router(x)
        if self.wemoe_router.depth == 0:
            return g
        if g.dim() == 3:
            mask = self.state.inputs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(g.shape[:2]):
                m = mask.to(g.dtype).unsqueeze(-1)
                g = (g * m).sum(1) / m.sum(1).clamp_min(1.0)
            else:
                g = g.mean(dim=1)
        return g.mean(dim=0) if self.batch_reduce else g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wemoe_router is not None:
            self.state.weights = self.route(x)
        w = self.state.weights
        if w is None:
            raise RuntimeError("a WEMoE MLP layer ran before its MLP's first layer set the routing weights")
        w = w.to(self.weight.dtype)
        if w.dim() == 1:  # one set of weights for the whole batch
            weight = self.weight + torch.einsum("e,eoi->oi", w, self.wemoe_tv_weight)
            bias = self.bias + w @ self.wemoe_tv_bias if self.wemoe_tv_bias is not None else self.bias
            return F.linear(x, weight, bias)
        if x.dim() == 2:
            x3 = x.unsqueeze(1)
        else:
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        outs = []
        step = max(1, PER_SAMPLE_ELEMENTS // max(1, self.weight.numel()))
        for a in range(0, x3.shape[0], step):  # per-sample weights, a few samples at a time
            wb = w[a:a + step]
            weight = self.weight + torch.einsum("be,eoi->boi", wb, self.wemoe_tv_weight)
            y = torch.bmm(x3[a:a + step], weight.transpose(1, 2))
            if self.bias is not None:
                bias = self.bias + (wb @ self.wemoe_tv_bias if self.wemoe_tv_bias is not None else 0)
                y = y + bias.unsqueeze(1)
            outs.append(y)
        y = torch.cat(outs)
        return y.squeeze(1) if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.wemoe_tv_weight.shape[0]}, router={self.wemoe_router is not None}")
