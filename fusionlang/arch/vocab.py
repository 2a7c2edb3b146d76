"""Vocabularies: which tensors are indexed by token, the output tokenizer of models with
different vocabularies, and how each model's token rows map onto it.

MergeKit 0.1.5's semantics (`mergekit/tokenizer/build.py`, `embed.py`):
- the output tokenizer is the base model's (`source="base"`), a given model's, or the
  union (`"union"`): the base's tokenizer plus, in the order the models are listed (base
  first), every token another model has and the base lacks (added as a normal token),
  then every model's added (special) tokens, with the settings of the first model that
  has it;
- a model's tokens at ids >= its config's vocab_size (tokenizer entries without a row)
  count as absent;
- per model, the row of each output token is the model's own row for that token; for a
  token the model lacks, a default row: the only model that has it gives its row, a
  token nobody has gets zeros, a token the base has gets the base's row, otherwise the
  mean of the rows of the models that have it;
- with `pad_to_multiple_of`, the vocabulary is padded up to a multiple and the extra rows
  are the mean of the real rows (per model).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out|tok_embeddings|shared|"
                          r"output)\.(weight|bias)$")


def vocab_size(config: dict) -> int | None:
    """The model's number of token rows (config.json `vocab_size`, or its text config's)."""
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def is_vocab_tensor(name: str, shape: tuple, config: dict) -> bool:
    """Whether tensor `name` of `shape` has one row per token (an embedding matrix, the LM
    head's weight or bias): a known name whose first dimension is the vocab size."""
    n = vocab_size(config)
    return bool(VOCAB_TENSOR.search(name)) and len(shape) >= 1 and n is not None and shape[0] == n


def load_tokenizer(model_dir: str):
    """The model directory's tokenizer (fast), transformers' messages quieted. Raises
    OSError / ValueError as transformers does when there is none."""
    from ..zoo.text import _quiet_transformers

    _quiet_transformers()
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True, use_fast=True)


def _config(model_dir: str) -> dict:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _rows(model_dir: str, tok) -> int:
    return vocab_size(_config(model_dir)) or len(tok.get_vocab())


def build(spec_json: str):
    """(output tokenizer, index [models, output tokens] (int64: each model's id of the
    output token, or -1 where it has none), output vocab size with padding) for a
    vocabulary spec (`spec`): {"dirs": [model dirs], "base": index of the
    base in dirs, "source": "union" | "base" | index of the model whose tokenizer is
    used, "pad_to_multiple_of": n or null, "chat_template": null (the output tokenizer's
    own) | "auto" (the template most models have; a tie: the first read) | index of the
    model whose template is used | the Jinja text}. Cached per spec (the plan's ops and
    the output writer share it). MergeKit's `chat_template`, its named templates included
    (`chat_templates.NAMED`)."""
    return _build(spec_json)


@lru_cache(maxsize=8)
def _build(spec_json: str):
    import tempfile

    from transformers import AutoTokenizer

    spec = json.loads(spec_json)
    dirs, base = spec["dirs"], spec["base"]
    toks = [load_tokenizer(d) for d in dirs]
    rows = [_rows(d, t) for d, t in zip(dirs, toks)]
    source = spec["source"]
    if source == "union":
        order = [base] + [i for i in range(len(dirs)) if i != base]
        out_vocab: dict[str, int] = {}
        added: dict[str, object] = {}
        for i in order:
            decoder = toks[i].added_tokens_decoder
            added_here = {info.content for info in decoder.values()}
            for t, idx in toks[i].get_vocab().items():
                if idx < rows[i] and t not in added_here and t not in out_vocab:
                    out_vocab[t] = len(out_vocab)
            for idx, info in decoder.items():
                if idx < rows[i] and info.content not in added:
                    added[info.content] = info
        with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's tokenizer object stays as it was
            toks[base].save_pretrained(tmp)
            out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
        base_vocab = toks[base].get_vocab()
        for t in out_vocab:
            if t not in added and t not in base_vocab:
                out.add_tokens(t)
        for info in added.values():
            out.add_tokens(info)
    else:
        out = toks[base if source == "base" else int(source)]
    ct = spec.get("chat_template")
    if ct is not None:
        out.chat_template = _chat_template(ct, toks)
    import torch

    vocab = out.get_vocab()
    idx = torch.full((len(toks), len(vocab)), -1, dtype=torch.long)
    for m, (t, n) in enumerate(zip(toks, rows)):
        mine = t.get_vocab()
        for tok, new in vocab.items():
            old = mine.get(tok, -1)
            if 0 <= old < n:
                idx[m, new] = old
    size = len(vocab)
    pad = spec.get("pad_to_multiple_of")
    if pad and size % pad:
        size = (size // pad + 1) * pad
    return out, idx, size


def _template(tok) -> str | None:
    t = tok.chat_template
    if isinstance(t, dict):
        t = t.get("default")
    return t.strip() if t else None


def _chat_template(ct, toks) -> str | None:
    from collections import Counter

    if ct == "auto":
        found = [t for t in map(_template, toks) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if isinstance(ct, int):
        return _template(toks[ct])
    from .chat_templates import NAMED

    return NAMED.get(ct, ct)


def realign(xs: list, which: int, spec_json: str):
    """Model `which`'s token rows (of `xs`, every model's tensor [its vocab, ...]) in the
    output vocabulary's order: [output vocab size, ...] (module docstring's rules).
    Raises ValueError when a model's tensor has fewer rows than its tokenizer ids need."""
    import torch

    _tok, idx, size = build(spec_json)
    base = json.loads(spec_json)["base"]
    n_tok = idx.shape[1]
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    device = xs[0].device
    for m, x in enumerate(xs):
        if int(idx[m].max()) >= x.shape[0]:
            raise ValueError(f"model {m}'s token tensor has {x.shape[0]} rows, its tokenizer needs {int(idx[m].max()) + 1}")
    present = idx >= 0
    count = present.sum(0)
    out = torch.zeros((size, *xs[which].shape[1:]), dtype=dtype, device=device)
    own = present[which].nonzero().flatten()
    out[own] = xs[which][idx[which, own].to(device)].to(dtype)
    missing = (~present[which]).nonzero().flatten().tolist()
    for t in missing:  # a default row (MergeKit `assign_embedding_sources`)
        have = present[:, t].nonzero().flatten().tolist()
        if count[t] == 0:
            continue  # zeros
        if count[t] == 1:
            out[t] = xs[have[0]][idx[have[0], t]].to(dtype)
        elif present[base, t]:
            out[t] = xs[base][idx[base, t]].to(dtype)
        else:
            out[t] = sum(xs[m][idx[m, t]].to(dtype) for m in have) / len(have)
    if size > n_tok:  # padding rows: the mean of the real ones
        out[n_tok:] = out[:n_tok].mean(dim=0)
    return out
