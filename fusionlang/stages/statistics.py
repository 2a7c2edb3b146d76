"""Statistics stages: model-shaped results, one tensor per covered weight.

gram   For every `nn.Linear` weight W [out, in]: the mean over the rows x (every token
       position of every example) of its input's outer product, G = (1/N) Σ x xᵀ
       [in, in], float32. Padded positions are not rows: the batches are formed from
       rows sorted by token length (little padding) and the positions the attention mask
       marks as padding are left out, so G does not depend on the batch size or the order
       of the rows. With `include_padding`, the batches follow the data's order and every
       position counts, padding included: FusionBench `RegMeanAlgorithm`'s hooks, whose
       Gram matrices therefore change with the batching (its dataloader shuffles). For an `nn.Conv2d` weight
       [out, in/g, kh, kw] with g groups, x runs over the unfolded input patches of each
       group (one per output position): G [g, in/g·kh·kw, in/g·kh·kw] ([d, d] when g = 1),
       so a 1×1 convolution is a Linear over channels and a depthwise one gets a kh·kw
       Gram matrix per channel. FusionBench `RegMeanAlgorithm` (hooks on nn.Linear inputs,
       the running mean over batch·sequence rows), extended to convolutions. Products and
       their sum in float32.
fisher For every parameter on the path to the logits: the diagonal Fisher information
       from the model's own predictive distribution, as FusionBench (after MergeLM)
       computes it: per batch, the squared gradient of Σ_b Σ_c √p_bc · log p_bc (p =
       softmax(logits), √p detached), summed over batches and divided by the number of
       examples. The estimate depends on which rows share a batch: `batch_order="length"`
       groups rows of similar token length (little padding, about half the forward and
       backward work on text of mixed lengths), "given" keeps the data's order (FusionBench
       shuffles its rows instead). With `normalize`, each model's values are divided by (‖F‖₂ + minimal)
       over all its covered parameters, and `minimal` is added first to every entry:
       the weights FusionBench's `merging_with_fisher_weights` multiplies with
       (normalize_fisher_weight, minimal_fisher_weight); up to a factor common to all
       models, which the merge's division cancels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .data import DataError, Examples
from .models import StageModel, batches, by_length, passes

if TYPE_CHECKING:
    from typing import Self  # Python 3.11

KINDS = ("gram", "fisher")


def covered_shapes(kind: str, sm: StageModel) -> dict[str, tuple[int, ...]]:
    """Tensor name (in the model's files) -> shape of the statistic a `kind` stage
    computes for it. Works on a meta-device module (compile time)."""
    out: dict[str, tuple[int, ...]] = {}
    if kind == "gram":
        for mname, m in sm.module.named_modules():
            w = sm.names.get(f"{mname}.weight" if mname else "weight")
            if w is None:
                continue
            if isinstance(m, torch.nn.Linear):
                out[w] = (m.in_features, m.in_features)
            elif isinstance(m, torch.nn.Conv2d):
                g = m.groups
                d = m.in_channels // g * m.kernel_size[0] * m.kernel_size[1]
                out[w] = (d, d) if g == 1 else (g, d, d)
        return out
    for pname, p in sm.module.named_parameters():
        if p.requires_grad and p.is_floating_point() and pname in sm.names:
            out[sm.names[pname]] = tuple(p.shape)
    return out


class GramHooks:
    """Forward hooks that sum the Gram matrix of the input of each given Linear / Conv2d
    module (`modules`: file tensor name of its weight -> module) while they run; gram()'s
    definition of rows. Set `keep` to the batch's non-padding positions [batch, seq] (bool)
    before a pass to leave padding out, None to count every position. Use as a context
    manager (the hooks are removed on exit); `result(shapes)` gives the means."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.keep: torch.Tensor | None = None
        self._last: list = [None, None, 0]  # the last Linear input seen, its product and row count
        self._handles = [m.register_forward_hook(self._hook(w, m)) for w, m in modules.items()]

    def _hook(self, name: str, m: torch.nn.Module):
        def fn(_mod, args, _out):
            x = args[0].detach()
            if isinstance(m, torch.nn.Conv2d):
                x = _patches(m, x)  # [g, rows, d]
            elif args[0] is self._last[0]:
                # NOTE: Linear layers fed by one tensor (an attention block's query, key and
                # value) share its product
                self._add(name, self._last[1], self._last[2])
                return
            elif self.keep is not None and x.dim() == 3 and x.shape[:2] == self.keep.shape:
                x = x[self.keep].unsqueeze(0)  # the real tokens' rows only
            else:
                x = x.reshape(1, -1, x.shape[-1])
            # NOTE: products and their sum in float32 (as FusionBench): a float64 matmul is
            # several times slower on CPU, and float64 sums would double the stage's memory
            g = torch.bmm(x.float().transpose(1, 2), x.float())
            if not isinstance(m, torch.nn.Conv2d):
                self._last[:] = [args[0], g, x.shape[1]]
            self._add(name, g, x.shape[1])
        return fn

    def _add(self, name: str, g: torch.Tensor, n: int) -> None:
        self.sums[name] = g.clone() if name not in self.sums else self.sums[name].add_(g)
        self.rows[name] = self.rows.get(name, 0) + n

    def pass_done(self) -> None:
        """Call after each forward pass: a new pass never shares the last pass's product."""
        self._last[:] = [None, None, 0]

    def result(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """File tensor name -> mean Gram matrix (float32, CPU) in `shapes[name]`, for the
        modules the passes reached."""
        return {name: self.sums.pop(name).div_(self.rows[name]).reshape(shape).cpu().contiguous()
                for name, shape in shapes.items() if name in self.sums}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def keep_mask(batch: dict) -> torch.Tensor | None:
    """The non-padding positions [batch, seq] (bool) of a batch of token inputs, or None
    when it has no padding (or no attention mask)."""
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None and mask.dim() == 2 and not bool(mask.all()) else None


def gram(sm: StageModel, ex: Examples, batch_size: int, on_batch: Callable[[int, int], None] | None = None,
         include_padding: bool = False) -> dict[str, torch.Tensor]:
    """Gram matrices of every Linear / Conv2d input over all rows of `ex` (see the module
    docstring). Returns file tensor name -> float32 CPU tensor."""
    shapes = covered_shapes("gram", sm)
    if not include_padding:
        ex = by_length(sm, ex)
    modules = {}
    for mname, m in sm.module.named_modules():
        w = sm.names.get(f"{mname}.weight" if mname else "weight")
        if w in shapes:
            modules[w] = m
    total = -(-len(ex) // batch_size)
    with GramHooks(modules) as hooks, torch.no_grad():
        for i, (start, stop) in enumerate(batches(ex, batch_size)):
            for part in passes(sm.inputs(ex, start, stop)):
                hooks.keep = None if include_padding else keep_mask(part)
                sm.run(part)
                hooks.pass_done()
            if on_batch:
                on_batch(i + 1, total)
    # a layer the forward pass never reached has no entry
    return hooks.result(shapes)


def _patches(m: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The unfolded input patches of a Conv2d, per group: [g, B·L, in/g·kh·kw]."""
    if m.padding_mode != "zeros":
        raise DataError("E014", f"Gram matrices of a convolution with padding_mode={m.padding_mode!r} are not supported",
                        "exclude that layer with a rule")
    if type(m).forward is not torch.nn.Conv2d.forward:
        # TensorFlow-style "same" convolutions (EfficientNet ports) pad inside forward():
        # the hook sees the unpadded input, so pad it the same way here
        if isinstance(getattr(m, "static_padding", None), torch.nn.Module):
            x = m.static_padding(x)
        elif "SamePadding" in type(m).__name__:
            x = _tf_same_pad(m, x)
        else:
            raise DataError("E014", f"Gram matrices of the convolution class {type(m).__name__} (its own forward) "
                            "are not supported", "exclude those layers with a rule")
    pad = m.padding if not isinstance(m.padding, str) else _same_padding(m)
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)  # [B, C·kh·kw, L]
    b, ck, length = cols.shape
    g = m.groups
    d = ck // g
    return cols.reshape(b, g, d, length).permute(1, 0, 3, 2).reshape(g, b * length, d)


def _tf_same_pad(m: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's "SAME" padding of `x` for conv `m` (extra row/column at the end)."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], m.weight.shape[-2:], m.stride, m.dilation):
        pads.append(max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0))
    ph, pw = pads
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _same_padding(m: torch.nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    kh, kw = m.kernel_size
    if (m.dilation[0] * (kh - 1)) % 2 or (m.dilation[1] * (kw - 1)) % 2:
        raise DataError("E014", "Gram matrices of a convolution with asymmetric 'same' padding are not supported",
                        "exclude that layer with a rule")
    return (m.dilation[0] * (kh - 1) // 2, m.dilation[1] * (kw - 1) // 2)


def fisher(sm: StageModel, ex: Examples, batch_size: int, normalize: bool = True, minimal: float = 1e-6,
           on_batch: Callable[[int, int], None] | None = None, batch_order: str = "length"
           ) -> dict[str, torch.Tensor]:
    """Fisher-merging weights of every covered parameter (see the module docstring).
    Parameters that get no gradient keep the value 0 (+ minimal). Returns file tensor
    name -> float32 CPU tensor. Raises DataError when the model has no logits."""
    if sm.logits is None:
        raise DataError("E014", "Fisher weights need the model's predictions, and this model has no classification head",
                        "use a model saved with its head, or data of a zoo task")
    if batch_order == "length":
        ex = by_length(sm, ex)
    shapes = covered_shapes("fisher", sm)
    params = {sm.names[n]: p for n, p in sm.module.named_parameters() if sm.names.get(n) in shapes}
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    total = -(-len(ex) // batch_size)
    for i, (start, stop) in enumerate(batches(ex, batch_size)):
        sm.module.zero_grad(set_to_none=True)
        for part in passes(sm.inputs(ex, start, stop)):  # the batch's gradient, accumulated over its slices
            logits = sm.logits(part)
            probs = torch.softmax(logits, dim=-1).detach()
            (probs.sqrt() * torch.log_softmax(logits, dim=-1)).sum().backward()
        for k, p in params.items():
            if p.grad is not None:
                acc[k].add_(p.grad.detach().double() ** 2)
        if on_batch:
            on_batch(i + 1, total)
    sm.module.zero_grad(set_to_none=True)
    out = {k: (v / len(ex)) for k, v in acc.items()}
    if normalize:
        norm = torch.sqrt(sum((v.float() ** 2).sum() for v in out.values())).double()
        out = {k: (v + minimal) / (norm + minimal) for k, v in out.items()}
    else:
        out = {k: v + minimal for k, v in out.items()}
    return {k: v.float().cpu().contiguous() for k, v in out.items()}
