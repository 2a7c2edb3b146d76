"""Tasks on the user's own data: `accuracy(data)` scores a model's own classification
head on labeled rows; `perplexity(data)` a causal language model's loss on text rows;
`exact_match(data)` its greedy answers to prompts.

    accuracy   the fraction of rows whose argmax logit is the row's label, with the model
               loaded as its config names it (`*ForSequenceClassification`,
               `*ForImageClassification`) and its own tokenizer / image processor.
    perplexity exp(mean token loss): the next-token cross-entropy of `AutoModelForCausalLM`
               summed over every predicted token of every row (padding excluded; rows
               truncated at the model's max_position_embeddings) and divided by their
               count. Lower is better. Also reported: `loss` (nats per token), `tokens`.
    exact_match the fraction of rows whose greedy continuation of the prompt answers the
               row's answer exactly (`eval.exact_match`: the leading integer for a numeric
               answer, else the first line's prefix of the answer's length); reported as
               the task's `accuracy`, with `exact_match` and `correct`.

`check(task, model_dir)` raises DataError (E014) for a model that cannot be scored on the
task: no head of the right kind, fewer classes than the labels need, no tokenizer.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ..stages import data as D
from ..stages.data import DataError

KINDS = ("accuracy", "perplexity", "exact_match")


def _config(model_dir: str) -> dict:
    from ..stages.models import read_config

    return read_config(model_dir)


def check(task: dict, model_dir: str, name: str) -> None:
    """DataError (E014) when model `name` (directory `model_dir`) cannot run task `task`."""
    config = _config(model_dir)
    archs = config.get("architectures") or []
    if task["kind"] == "lm_eval":
        if not any(a.endswith("ForCausalLM") for a in archs):
            raise DataError("E014", f"'{name}' ({', '.join(archs) or config.get('model_type')}) is not a causal "
                            "language model, which lm-eval's HFLM runs", "evaluate *ForCausalLM models on lm_eval() tasks")
        if not any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise DataError("E014", f"'{name}' has no tokenizer files next to its weights", "save the tokenizer with "
                            "the model; a merge copies its reference model's")
        return
    ex = D.load(task["data"])
    if task["kind"] == "accuracy":
        if ex.labels is None:
            raise DataError("E006", "accuracy() needs labeled data: name the label column with label=", "", "data")
        if not any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in archs):
            raise DataError("E014", f"'{name}' ({', '.join(archs) or config.get('model_type')}) has no classification "
                            "head to score accuracy() with", "evaluate a model saved with its head "
                            "(e.g. *ForSequenceClassification)")
        n_labels = len(config.get("id2label") or {}) or int(config.get("num_labels") or 2)
        top = max(ex.labels)
        if top >= n_labels:
            raise DataError("E014", f"the data has label {top} but '{name}''s head knows {n_labels} classes "
                            f"(0..{n_labels - 1})", "use labels the model was trained with, or a model with that many classes")
    else:
        if task["kind"] == "perplexity" and ex.texts is None:
            raise DataError("E006", "perplexity() needs text data: name the text column with text=", "", "data")
        if task["kind"] == "exact_match" and (ex.prompts is None or ex.answers is None):
            raise DataError("E006", "exact_match() needs prompts and answers: name their columns with prompt= and "
                            "answer=", "", "data")
        if not any(a.endswith("ForCausalLM") for a in archs):
            what = "has no perplexity" if task["kind"] == "perplexity" else "cannot generate answers"
            raise DataError("E014", f"'{name}' ({', '.join(archs) or config.get('model_type')}) is not a causal "
                            f"language model, so it {what}", "evaluate a *ForCausalLM model")
    if (ex.texts is not None or ex.prompts is not None) and not any((Path(model_dir) / f).is_file()
                                        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise DataError("E014", f"'{name}' has no tokenizer files next to its weights", "save the tokenizer with the "
                        "model (tokenizer.save_pretrained(dir)); a merge copies its reference model's")


def score(model_dir: str | dict, task: dict, device: str, on_batch=None) -> dict:
    """Score a model directory on a user task. Returns the metric (`accuracy`, or
    `perplexity` with `loss` and `tokens`; for exact_match `accuracy` = `exact_match`), `n`, `latency_per_batch_s`, `peak_mem_bytes`.
    An accuracy() task also reports `loss`: the mean cross-entropy (nats per row) of the head's logits against the labels.
    An ensemble (`model_dir` a dict of members, weights, mode) combines its members' logits."""
    if task["kind"] == "lm_eval":
        if isinstance(model_dir, dict):
            raise DataError("E014", "an ensemble has no single model for lm-eval to run",
                            "evaluate its members, or a merge of them, on lm_eval() tasks")
        from .lm_eval import score as lm_score

        return lm_score(model_dir, task, device, on_batch)
    import torch

    from ..zoo.evaluate import _peak_mem_bytes
    from ..zoo.text import _quiet_transformers

    _quiet_transformers()
    import transformers

    ex = D.load(task["data"])
    bs = int(task.get("batch_size") or 32)
    if task["kind"] == "exact_match":
        return _exact_match(model_dir, ex, task, bs, device, on_batch)
    ens = model_dir if isinstance(model_dir, dict) else None
    dirs = [m["path"] for m in ens["members"]] if ens else [model_dir]
    model_dir = dirs[0]  # tokenizer, processor and config: the first member's
    config = _config(model_dir)
    archs = config.get("architectures") or []
    if task["kind"] == "perplexity":
        cls = transformers.AutoModelForCausalLM
    elif any(a.endswith("ForImageClassification") for a in archs):
        cls = transformers.AutoModelForImageClassification
    else:
        cls = transformers.AutoModelForSequenceClassification
    from ..arch.upscaled import from_pretrained  # a SMILE model: its upscaled layers

    models = [from_pretrained(cls, d, local_files_only=True, dtype=torch.float32).to(device).eval() for d in dirs]
    if ex.texts is not None:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
    else:
        proc = transformers.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    max_len = int(config.get("max_position_embeddings") or config.get("n_positions") or 512)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    correct, loss_sum, tokens, times = 0, 0.0, 0, []
    total = -(-len(ex) // bs)
    with torch.no_grad():
        for i, start in enumerate(range(0, len(ex), bs)):
            stop = min(len(ex), start + bs)
            t0 = time.perf_counter()
            if ex.texts is not None:
                batch = tok(list(ex.texts[start:stop]), padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            else:
                batch = proc(images=list(ex.images[start:stop]), return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            outs = [m(**batch).logits for m in models]
            if ens:
                from ..ops.ensemble import combine

                all_logits = combine(outs, ens["weights"], ens["normalize"], ens["mode"])
            else:
                all_logits = outs[0]
            if task["kind"] == "accuracy":
                pred = all_logits.argmax(-1).cpu()
                labels = torch.as_tensor(ex.labels[start:stop])
                correct += int((pred == labels).sum())
                loss_sum += float(torch.nn.functional.cross_entropy(all_logits.float().cpu(), labels, reduction="sum"))
            else:
                logits = all_logits[:, :-1].float()
                target = batch["input_ids"][:, 1:]
                mask = batch["attention_mask"][:, 1:].bool()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                        reduction="none").reshape(target.shape)
                loss_sum += float(nll[mask].double().sum())
                tokens += int(mask.sum())
            times.append(time.perf_counter() - t0)
            if on_batch:
                on_batch(i + 1, total)
    res = {"n": len(ex), "latency_per_batch_s": sum(times) / len(times) if times else 0.0,
           "peak_mem_bytes": _peak_mem_bytes(device), "batch_size": bs}
    if task["kind"] == "accuracy":
        res["accuracy"] = correct / len(ex)
        res["loss"] = loss_sum / len(ex)  # mean cross-entropy (nats) of the head's logits against the labels
    else:
        loss = loss_sum / tokens if tokens else float("nan")
        res.update(loss=loss, perplexity=math.exp(loss) if tokens else float("nan"), tokens=tokens)
    return res



def _exact_match(model_dir, ex, task: dict, bs: int, device: str, on_batch) -> dict:
    """An exact_match() task on one causal LM (greedy decoding; see `eval.exact_match`)."""
    if isinstance(model_dir, dict):
        raise DataError("E014", "an ensemble combines predictions, and greedy decoding of a mean of logits is not "
                        "defined here", "evaluate its members, or a merge of them, on exact_match() tasks")
    from ..zoo.evaluate import _peak_mem_bytes
    from .exact_match import exact_match
    from .sources import load_causal_lm

    model, tok = load_causal_lm(model_dir, device)
    t0 = time.perf_counter()
    res = exact_match(model, tok, ex.prompts, ex.answers, batch_size=bs, device=device, on_batch=on_batch,
                      max_new_tokens=task.get("max_new_tokens"))
    batches = max(1, -(-len(ex) // bs))
    return {**res, "accuracy": res["exact_match"], "latency_per_batch_s": (time.perf_counter() - t0) / batches,
            "peak_mem_bytes": _peak_mem_bytes(device), "batch_size": bs}

