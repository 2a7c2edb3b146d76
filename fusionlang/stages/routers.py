"""Router initialisation for mixtures of experts built from dense models (mergekit-moe's
`gate_mode`s), as a model stage: its result holds one matrix per layer, `router.{l}`
[E, hidden] float32, row j the gate vector of expert j.

hidden       the base model's hidden state at each layer's input (transformers'
             `hidden_states[l]`) at the last token of each of expert j's positive prompts,
             averaged over the prompts, minus the same over its negative prompts, then
             normalised to unit length per layer.
hidden_avg   the same with each prompt's hidden states averaged over its tokens.
cheap_embed  the input embeddings of the prompts' tokens summed (no forward pass),
             normalised, the same vector at every layer; negative prompts subtracted,
             normalised again.
random       N(0, 1) entries; uniform_random: U(−1/√hidden, 1/√hidden) (nn.Linear's
             initialisation), both from a generator seeded with `seed`.

Each prompt is the tokenizer's BOS token text followed by the prompt, tokenized without
other special tokens, as mergekit-moe 0.1.5 (`moe/router.py`). Prompts of different
lengths are padded and only real tokens count, so each prompt's vectors are those of the
prompt run alone (tested); mergekit-moe's average over positions counts the padding (its
`hidden_avg` of prompts of different lengths differs). Both give the same numbers when no
prompt is padded. The forward pass runs in `dtype`
(mergekit-moe: bfloat16; "float32" is more precise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data import DataError

MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute(stage: dict, device, log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The router matrices of `stage` (params: mode, positive, negative, num_layers,
    hidden_size, dtype, seed, shared): "router.{l}" -> [E, hidden] float32 CPU tensor;
    with `shared`, the last prompt list is the shared expert's and "shared_router.{l}"
    [1, hidden] its gate (Qwen2-MoE's shared_expert_gate)."""
    p = stage["params"]
    mode, layers, hidden = p["mode"], int(p["num_layers"]), int(p["hidden_size"])
    experts = len(p["positive"])
    if mode in ("random", "uniform_random"):
        g = torch.Generator().manual_seed(int(p["seed"]))
        if mode == "random":
            gates = torch.randn((layers, experts, hidden), generator=g)
        else:
            scale = (1.0 / hidden) ** 0.5
            gates = torch.rand((layers, experts, hidden), generator=g) * 2 * scale - scale
    else:
        gates = _from_prompts(stage, mode, layers, device, log)
    n = experts - 1 if p.get("shared") else experts  # the last row: the shared expert's gate
    out = {f"router.{layer}": gates[layer, :n].float().cpu().contiguous() for layer in range(layers)}
    if p.get("shared"):
        out.update({f"shared_router.{layer}": gates[layer, n:].float().cpu().contiguous() for layer in range(layers)})
    return out


def _from_prompts(stage: dict, mode: str, layers: int, device, log) -> torch.Tensor:
    from transformers import AutoTokenizer

    from ..zoo.text import _quiet_transformers

    _quiet_transformers()
    p = stage["params"]
    model_dir = stage["model_dir"]
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError("E014", f"the base model has no tokenizer to read the router prompts with ({e})",
                        "save the tokenizer files next to the base model, or use gate_mode=\"random\"") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    # NOTE: padding on the right keeps each prompt's positions 0..n-1, as when it runs
    # alone (the rotary models this serves would not mind left padding's uniform shift)
    tok.padding_side = "right"
    dtype = DTYPES[p["dtype"]]
    if mode == "cheap_embed":
        from pathlib import Path

        from safetensors import safe_open

        embed = None
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                if p["embed"] in set(fh.keys()):
                    embed = fh.get_tensor(p["embed"]).float()
        assert embed is not None, p["embed"]  # the plan checked the base has it

        def vectors(prompts: list[str]) -> torch.Tensor:
            batch = _tokenize(tok, prompts)
            h = embed[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)
            v = h.sum(dim=1).sum(dim=0, keepdim=True)
            return (v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device).eval()

        def vectors(prompts: list[str]) -> torch.Tensor:
            batch = {k: v.to(device) for k, v in _tokenize(tok, prompts).items()}
            with torch.no_grad():
                hs = _layer_inputs(model, batch)  # [layers, prompts, tokens, hidden]
            mask = batch["attention_mask"]
            if mode == "hidden_avg":
                m = mask.to(hs.dtype)[None, :, :, None]
                v = (hs * m).sum(dim=2) / mask.sum(dim=1).to(hs.dtype)[None, :, None]
            else:  # the last real token of each prompt (left or right padding)
                last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
                v = hs[:, torch.arange(hs.shape[1], device=hs.device), last]
            return v.sum(dim=1) / v.shape[1]

    rows = []
    for j, (pos, neg) in enumerate(zip(p["positive"], p["negative"])):
        v = vectors(pos)
        if neg:
            v = v - vectors(neg)
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
        if log:
            log(f"expert {j + 1}/{len(p['positive'])}: {len(pos)} prompt(s)" + (f", {len(neg)} negative" if neg else ""))
    return torch.stack(rows).permute(1, 0, 2).float()  # [layers, experts, hidden]


class _Enough(Exception):
    """Raised by the last decoder layer's pre-hook: every input needed is captured."""


def _layer_inputs(model, batch: dict) -> torch.Tensor:
    """The hidden state entering each decoder layer, [layers, batch, tokens, hidden]: what
    transformers returns as `hidden_states[:-1]` with `output_hidden_states`, captured by
    forward pre-hooks that stop the pass at the last layer's input (its MLP, the final
    norm and the LM head would only be thrown away: ~15% of a small model's pass)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        out = model(**batch, output_hidden_states=True, return_dict=True)
        return torch.stack(out.hidden_states[:-1])
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs, last=layers[-1]):
        captured.append(args[0] if args else kwargs["hidden_states"])
        if module is last:
            raise _Enough

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        model(**batch, return_dict=True)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured)


def _tokenize(tok, prompts: list[str]) -> dict:
    return dict(tok([(tok.bos_token or "") + q for q in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False))


def conditioning(gates: torch.Tensor, prompts: list[list[str]], threshold: float = 5.0) -> str:
    """A warning (empty when none) for layers whose router matrix [E, hidden] is badly
    conditioned (condition number > `threshold`, mergekit-moe's rule): some experts' gate
    vectors are nearly parallel, so the router cannot tell their inputs apart. Names the
    most parallel pair of experts, its cosine similarity and their first prompts."""
    bad = []
    worst = (0.0, 0, 0, 0)
    for layer in range(gates.shape[0]):
        g = gates[layer].double()
        if g.shape[0] < 2:
            continue
        if float(torch.linalg.cond(g)) > threshold:
            bad.append(layer)
            u = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            cos = (u @ u.T).fill_diagonal_(-2.0)
            k = int(cos.argmax())
            i, j = divmod(k, g.shape[0])
            if float(cos[i, j]) > worst[0]:
                worst = (float(cos[i, j]), i, j, layer)
    if not bad:
        return ""
    cos, i, j, layer = worst
    shown = f"layers {_ranges(bad)}" if len(bad) > 1 else f"layer {bad[0]}"
    first = (lambda k: repr(prompts[k][0]) if k < len(prompts) and prompts[k] else "(random)")
    return (f"warning: the router is badly conditioned at {shown} of {gates.shape[0]} (condition number > {threshold:g}): "
            f"experts {i} and {j} have nearly parallel gate vectors (cosine {cos:.3f} at layer {layer}; prompts "
            f"{first(i)} and {first(j)}), so tokens will rarely tell them apart; give them more distinct prompts")


def conditioning_of(file, stage: dict) -> str:
    """`conditioning` of a router stage's saved result."""
    from safetensors.torch import load_file

    values = load_file(str(file))
    gates = torch.stack([values[f"router.{i}"] for i in range(stage["params"]["num_layers"])])
    return conditioning(gates, stage["params"]["positive"])


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ", ".join(out)
