"""Permutation specs: which axes of which tensors share a permutable set of hidden units.

A network's function does not change when the hidden units of a layer are permuted and
every tensor indexed by those units is permuted the same way (Git Re-Basin, Ainsworth et
al. 2023, §2 "permutation spec"; its `PermutationSpec` of `axes_to_perm`). This module
derives that spec from a model's config and tensor shapes, as data:

- `fusionlang-net` sequential nets (`arch.nets`): each Linear / Conv2d output but the
  logits is a permutation (`hidden` / `channels`); its members are the layer's weight
  rows and bias, the BatchNorm after it (weight, bias, running_mean, running_var) and the
  next parametric layer's input axis (after `flatten` of a C×H×W map, blocks of H·W).
- Llama-family transformers (llama, mistral, qwen2) and GPT-2: per block, the MLP's
  hidden units (`mlp`) and the attention heads as units (`heads`: with grouped-query
  attention, a key/value head together with its group of query heads).

The residual stream (embeddings, norms, attention and MLP outputs, tied input/output
embeddings) is shared by every block and is never permuted: asking for it is an error.

A member axis of length L is viewed as [repeats, size, unit]: `size` units of `unit`
contiguous entries, repeated `repeats` times (GPT-2's fused q|k|v columns: repeats 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import split_layer
from .nets import MODEL_TYPE as NET_TYPE

KINDS = ("hidden", "channels", "mlp", "heads")
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_TYPES = ("gpt2",)


class PermutationError(ValueError):
    """A model whose units cannot be permuted safely. `code` (E014 architecture, E006 a
    bad `axes` choice), `message`, `hint`, `arg` (the argument at fault, or None)."""

    def __init__(self, code: str, message: str, hint: str = "", arg: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint, self.arg = code, message, hint, arg


@dataclass(frozen=True)
class Member:
    """Axis `axis` of tensor `tensor`, viewed as [repeats, units, unit]. `role` "out":
    the tensor produces the units (a layer's weight rows, its bias, a norm's vectors);
    "in": it consumes them (the next layer's input axis). `match`: whether its entries
    enter the matching cost (BatchNorm's running statistics move with their channels but
    are not weights: their scale would swamp the filters')."""

    tensor: str
    axis: int
    role: str = "out"
    repeats: int = 1
    unit: int = 1
    match: bool = True  # False: moved with the units, not part of the matching cost (BatchNorm statistics)


@dataclass(frozen=True)
class Perm:
    """One permutable set of `size` units. `consumer`: (module path, "linear" | "conv",
    repeats, unit) of the layer whose input the units are: its input activations, seen
    along the last axis (linear) or axis 1 (conv), are the units' activations."""

    name: str
    kind: str
    size: int
    members: tuple[Member, ...]
    consumer: tuple[str, str, int, int] | None = None


@dataclass(frozen=True)
class PermSpec:
    """The permutations of a model, in network order (inputs to outputs)."""

    perms: tuple[Perm, ...]

    def by_tensor(self) -> dict[str, list[tuple[Perm, Member]]]:
        """tensor name -> the (perm, member) pairs that touch it."""
        out: dict[str, list[tuple[Perm, Member]]] = {}
        for p in self.perms:
            for m in p.members:
                out.setdefault(m.tensor, []).append((p, m))
        return out


def derive(config: dict, shapes: dict[str, tuple[int, ...]], axes: tuple[str, ...] | None = None) -> PermSpec:
    """The permutation spec of a model from its config.json and {tensor: shape}.

    `axes`: the kinds of units to permute (default: all the architecture has). Raises
    PermutationError: E014 for an architecture without a known spec or tensors that do
    not fit it (a shared axis: tied weights), E006 for `axes` naming the residual stream
    or an unknown kind."""
    if axes is not None:
        for a in axes:
            if a == "residual":
                raise PermutationError(
                    "E006", "the residual stream cannot be permuted safely: every block reads and writes it "
                    "through skip connections, and input/output embeddings may be tied",
                    "align hidden units instead: axes=[\"mlp\", \"heads\"] (transformers) or leave axes out", "axes")
            if a not in KINDS:
                raise PermutationError("E006", f"unknown kind of units {a!r}",
                                       f"choose among {', '.join(KINDS)}", "axes")
    mt = config.get("model_type")
    if mt == NET_TYPE:
        perms = _net(config, shapes)
    elif mt in LLAMA_TYPES:
        perms = _llama(config, shapes)
    elif mt in GPT2_TYPES:
        perms = _gpt2(config, shapes)
    else:
        raise PermutationError(
            "E014", f"no permutation spec is known for model_type {mt!r}",
            f"alignment knows {NET_TYPE} nets, {', '.join(LLAMA_TYPES + GPT2_TYPES)} transformers")
    if axes is not None:
        perms = [p for p in perms if p.kind in axes]
    spec = PermSpec(tuple(perms))
    check(spec, shapes)
    return spec


def check(spec: PermSpec, shapes: dict[str, tuple[int, ...]]) -> None:
    """PermutationError (E014) when a member tensor is missing, its axis does not have
    repeats·size·unit entries, or one axis belongs to two permutations (tied weights)."""
    seen: dict[tuple[str, int], str] = {}
    for p in spec.perms:
        for m in p.members:
            if m.tensor not in shapes:
                raise PermutationError("E014", f"tensor '{m.tensor}' of permutation '{p.name}' is missing",
                                       "the model's files do not hold the tensors its config describes")
            shape = shapes[m.tensor]
            want = m.repeats * p.size * m.unit
            if m.axis >= len(shape) or shape[m.axis] != want:
                raise PermutationError("E014", f"'{m.tensor}' has shape {list(shape)}, but permutation '{p.name}' "
                                       f"expects {want} entries on axis {m.axis}",
                                       "the model's config does not describe its tensors")
            key = (m.tensor, m.axis)
            if key in seen:
                raise PermutationError("E014", f"axis {m.axis} of '{m.tensor}' is shared by permutations "
                                       f"'{seen[key]}' and '{p.name}' (tied weights): it cannot be permuted safely",
                                       "untie the weights, or align the other units only (axes=[...])")
            seen[key] = p.name


def _net(config: dict, shapes: dict) -> list[Perm]:
    layers = config.get("layers") or []
    param = [i for i, lay in enumerate(layers) if lay.get("type") in ("linear", "conv")]
    perms: list[Perm] = []
    cur: tuple[str, int, list] | None = None  # (perm name, size, members)
    spatial = False  # the layer input is a C×H×W map: after `flatten`, a channel is H·W inputs

    def close(consumer=None):
        if cur is not None:
            name, size, members = cur
            kind = "channels" if any(len(shapes.get(m.tensor, ())) == 4 for m in members
                                     if m.role == "out") else "hidden"
            perms.append(Perm(name, kind, size, tuple(members), consumer))

    for i, lay in enumerate(layers):
        t = lay.get("type")
        if t in ("linear", "conv"):
            w = f"net.{i}.weight"
            if w not in shapes:
                raise PermutationError("E014", f"tensor '{w}' of layer {i} ({t}) is missing",
                                       "the model's files do not hold the tensors its config describes")
            if cur is not None:
                unit = 1
                if t == "linear" and spatial:
                    unit = max(1, shapes[w][1] // cur[1])
                cur[2].append(Member(w, 1, "in", 1, unit))
                close((f"net.{i}", t, 1, unit))
                cur = None
            spatial = t == "conv"
            if i != param[-1]:
                members = [Member(w, 0)]
                if f"net.{i}.bias" in shapes:
                    members.append(Member(f"net.{i}.bias", 0))
                cur = (f"net.{i}", int(shapes[w][0]), members)
        elif t == "bn" and cur is not None:
            cur[2].extend(Member(f"net.{i}.{k}", 0, match=k in ("weight", "bias"))
                          for k in ("weight", "bias", "running_mean", "running_var") if f"net.{i}.{k}" in shapes)
        elif t == "gap":
            spatial = False
    close()
    return perms


def _blocks(shapes: dict, suffix: str) -> dict[int, str]:
    """layer index -> the tensor name ending in `suffix` inside the layer stack."""
    out = {}
    for name in shapes:
        s = split_layer(name)
        if s and s[2] == suffix:
            out[s[1]] = name[: -len(suffix)]
    return out


def _llama(config: dict, shapes: dict) -> list[Perm]:
    heads = int(config.get("num_attention_heads", 0))
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or (int(config.get("hidden_size", 0)) // max(heads, 1)))
    if heads <= 0 or kv <= 0 or heads % kv:
        raise PermutationError("E014", f"config.json has num_attention_heads={heads}, num_key_value_heads={kv}",
                               "the numbers of heads must divide each other")
    g = heads // kv
    perms = []
    for i, pre in sorted(_blocks(shapes, "self_attn.q_proj.weight").items()):
        a = f"{pre}self_attn."
        members = [Member(f"{a}q_proj.weight", 0, unit=g * hd), Member(f"{a}k_proj.weight", 0, unit=hd),
                   Member(f"{a}v_proj.weight", 0, unit=hd)]
        members += [Member(f"{a}{p}_proj.bias", 0, unit=g * hd if p == "q" else hd) for p in "qkv"
                    if f"{a}{p}_proj.bias" in shapes]
        members.append(Member(f"{a}o_proj.weight", 1, "in", unit=g * hd))
        perms.append(Perm(f"{pre}self_attn.heads", "heads", kv, tuple(members), (f"{a}o_proj", "linear", 1, g * hd)))
        m = f"{pre}mlp."
        if f"{m}up_proj.weight" in shapes:
            size = int(shapes[f"{m}up_proj.weight"][0])
            members = [Member(f"{m}gate_proj.weight", 0), Member(f"{m}up_proj.weight", 0),
                       Member(f"{m}down_proj.weight", 1, "in")]
            perms.append(Perm(f"{pre}mlp", "mlp", size, tuple(members), (f"{m}down_proj", "linear", 1, 1)))
    if not perms:
        raise PermutationError("E014", "found no attention or MLP blocks of the Llama layout (model.layers.N."
                               "self_attn.q_proj.weight)", "the files do not hold the layout their config names")
    return perms


def _gpt2(config: dict, shapes: dict) -> list[Perm]:
    heads = int(config.get("n_head", 0))
    d = int(config.get("n_embd", 0))
    if heads <= 0 or d % heads:
        raise PermutationError("E014", f"config.json has n_head={heads}, n_embd={d}", "n_embd must be n_head·head size")
    hd = d // heads
    perms = []
    for i, pre in sorted(_blocks(shapes, "attn.c_attn.weight").items()):
        a = f"{pre}attn."
        members = [Member(f"{a}c_attn.weight", 1, repeats=3, unit=hd)]
        if f"{a}c_attn.bias" in shapes:
            members.append(Member(f"{a}c_attn.bias", 0, repeats=3, unit=hd))
        members.append(Member(f"{a}c_proj.weight", 0, "in", unit=hd))  # Conv1D: [in, out]
        perms.append(Perm(f"{pre}attn.heads", "heads", heads, tuple(members), (f"{a}c_proj", "linear", 1, hd)))
        m = f"{pre}mlp."
        if f"{m}c_fc.weight" in shapes:
            size = int(shapes[f"{m}c_fc.weight"][1])
            members = [Member(f"{m}c_fc.weight", 1)]
            if f"{m}c_fc.bias" in shapes:
                members.append(Member(f"{m}c_fc.bias", 0))
            members.append(Member(f"{m}c_proj.weight", 0, "in"))
            perms.append(Perm(f"{pre}mlp", "mlp", size, tuple(members), (f"{m}c_proj", "linear", 1, 1)))
    if not perms:
        raise PermutationError("E014", "found no GPT-2 blocks (h.N.attn.c_attn.weight)",
                               "the files do not hold the layout their config names")
    return perms
