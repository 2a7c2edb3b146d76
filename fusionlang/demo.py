"""`fusionlang demo`: build a tiny offline model family and merge it several ways.

The models are random-init Llama-architecture decoders (base + three "fine-tunes" =
base + structured noise), built from a `transformers` config: no download, seconds
on a laptop CPU. The spec written next to them is a tour of the language.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

DEMO_SPEC = '''# The fusionlang demo: one base model, three fine-tunes, six merges.
use merging

model base = local("models/base")
models experts = [local("models/math"), local("models/code"), local("models/chat")]

# Model soup: the uniform average.
merge soup = average(experts)

# Task arithmetic with MergeKit's per-model weights.
merge ta = task_arithmetic(base, experts, scale=0.5, weights=[1.0, 0.5, 0.5])

# TIES with per-layer rules: first match wins, `{i}` is the layer index.
merge tuned = ties(base, experts, density=0.3) {
    "*norm.weight" => base
    "layers.{i}.mlp.*" => ties(base, experts, density=ramp(0.5, 0.1))
}

# DARE-TIES, seeded: the same spec gives bit-identical outputs.
merge dare_ties = dare(base, experts, density=0.5, consensus=true, seed=7)

# SLERP between two fine-tunes, t varying over depth (a MergeKit gradient).
merge sphere = slerp(experts[0], experts[1], t=[0.0, 0.5, 1.0])

# Passthrough: a deeper model from layer ranges of two models.
merge deep = slices([layers(base, 0, 3), layers(experts[0], 1, 4)])

save soup to "out/soup"
save ta to "out/ta"
save tuned to "out/tuned" as bf16
save dare_ties to "out/dare_ties"
save sphere to "out/sphere"
save deep to "out/deep"
'''

EXPERTS = ("math", "code", "chat")


def build_models(root: Path, seed: int = 0) -> None:
    """Base + 3 experts; each expert moves a different subset of layers further."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tqdm bars per shard are noise in the demo's output
    if all((root / n / "model.safetensors").exists() for n in ("base", *EXPERTS)):
        return
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    state = base.state_dict()
    for j, name in enumerate(EXPERTS):
        g = torch.Generator().manual_seed(seed + 1 + j)
        sd = {}
        for k, v in state.items():
            strength = 0.02 * (1 + (hash_layer(k) + j) % 3)
            sd[k] = v + strength * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g)
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(sd)
        m.save_pretrained(root / name)


def hash_layer(name: str) -> int:
    from .arch import layer_of

    i = layer_of(name)
    return 0 if i is None else i


def write_spec(root: Path, console) -> Path:
    """Write the demo spec as `root/demo.fuse` and return its path; a `demo.fuse` the user
    has edited is kept: the demo's own spec then goes to `demo.original.fuse` beside it.
    Raises FuseErrors (E016) when that file too exists with other contents."""
    from .lang.diagnostics import Diagnostic, FuseErrors, Span

    spec = root / "demo.fuse"
    root.mkdir(parents=True, exist_ok=True)
    for path in (spec, root / "demo.original.fuse"):
        try:
            current = path.read_text(encoding="utf-8") if path.exists() else None
        except (OSError, UnicodeDecodeError):
            current = ""  # unreadable: not ours to overwrite
        if current == DEMO_SPEC:
            console.print(f"{path} is the demo's spec, unchanged")
            return path
        if current is None:
            path.write_text(DEMO_SPEC)
            console.print(f"wrote {path}")
            return path
        console.print(f"[yellow]kept[/] {path}: it differs from the demo's spec (your edits are not overwritten)",
                      soft_wrap=True)
    raise FuseErrors([Diagnostic(
        "E016", f"'{spec}' and '{root / 'demo.original.fuse'}' both hold edits; the demo overwrites neither",
        Span(str(spec), 1, 1),
        f"run your spec with `fusionlang run {spec}`, or start a fresh demo elsewhere: `fusionlang demo --dir DIR`")])


def run_demo(directory: str, console, run_spec: Callable[[str], int]) -> int:
    """`fusionlang demo`: build the tiny family under `directory`, write the demo spec
    (keeping a user-edited `demo.fuse`, see `write_spec`), run it with `run_spec(path)`
    (the CLI's `fusionlang run`, so the user sees what that command shows; returns its exit
    code), then load every output with `transformers` and run a forward pass. Returns the
    exit code; FuseErrors on a user error."""
    from rich.table import Table

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(directory)
    console.print(f"[bold]fusionlang demo[/] in {root}/ (offline)")
    spec = write_spec(root, console)  # before anything is built: a refusal leaves nothing behind
    console.print("building a tiny model family: base + math, code, chat fine-tunes ...")
    build_models(root / "models")
    console.print(f"compiling and running {spec}:\n")
    rc = run_spec(str(spec))
    if rc != 0:
        return rc
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from .runtime.reader import TORCH_DTYPES  # noqa: F401  (torch is loaded here anyway)

    t = Table(title="merged models: load in transformers, forward pass, distance to inputs", title_justify="left")
    for c in ("merge", "layers", "params", "logits", "‖m − base‖", "‖m − math‖"):
        t.add_column(c)
    base = _flat(root / "models/base")
    math = _flat(root / "models/math")
    ids = torch.arange(12).reshape(1, 12)
    for name in ("soup", "ta", "tuned", "dare_ties", "sphere", "deep"):
        path = root / "out" / name
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            logits = model(ids).logits
        cfg = json.loads((path / "config.json").read_text())
        flat = _flat(path)
        same = flat.numel() == base.numel()
        t.add_row(name, str(cfg["num_hidden_layers"]), f"{sum(p.numel() for p in model.parameters()):,}",
                  "x".join(map(str, logits.shape)), f"{(flat - base).norm():.3f}" if same else "-",
                  f"{(flat - math).norm():.3f}" if same else "-")
    console.print(t)
    console.print(f"\nnext: edit {spec} and run `fusionlang run {spec}`; `fusionlang compile {spec} --emit text` "
                  "shows the merge plan.")
    return 0


def _flat(path: Path):
    import torch
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return torch.cat([sd[k].float().reshape(-1) for k in sorted(sd)])
