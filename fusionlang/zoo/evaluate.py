"""Evaluate a model on a zoo task: the API behind the language's ``eval`` statement.

    evaluate("out/merged", "austen", zoo="text") -> {"accuracy": 0.71, "n": 600, ...}

A task is a head (``heads/<task>.safetensors``: ``weight`` [C, D], ``bias`` [C]) plus its
description (``heads/<task>.json``: class names, pooling, max_length, and how to load its
data: loader name + keyword arguments, including the seed, so the split is re-drawn
exactly). The model is a directory with the base's architecture (what a merge writes) or
a state dict with the base's tensor names.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ZooError
from .paths import zoo_dir, zoo_root

__all__ = ["TaskSpec", "evaluate", "find_task", "list_zoos", "load_task_data"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    zoo_dir: Path
    kind: str  # "text" | "vision"
    head_path: Path
    info: dict  # the head's JSON

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def base_dir(self) -> Path:
        return self.zoo_dir / "base"

    def head(self):
        from safetensors.torch import load_file

        h = load_file(str(self.head_path))
        return h["weight"], h["bias"]


def list_zoos(cache=None) -> list[Path]:
    root = zoo_root(cache)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "zoo.json").is_file())


def _zoo_path(zoo, cache) -> Path:
    p = Path(zoo)
    if (p / "zoo.json").is_file():
        return p
    d = zoo_dir(str(zoo), cache)
    if (d / "zoo.json").is_file():
        return d
    raise ZooError(f"zoo {zoo!r} is not built (looked in {p} and {d})",
                   hint=f"build it with: fusionlang zoo build {Path(str(zoo)).name}")


def find_task(task: str | os.PathLike, zoo: str | os.PathLike | None = None, cache=None) -> TaskSpec:
    """Resolve ``task``: a head JSON path, ``"ZOO/TASK"``, or ``TASK`` (with ``zoo=``, or
    searched in every built zoo)."""
    tp = Path(task)
    if tp.suffix == ".json" and tp.is_file():
        info = json.loads(tp.read_text())
        zdir = tp.parent.parent
        return TaskSpec(info["task"], zdir, info["kind"], tp.with_suffix(".safetensors"), info)
    name = str(task)
    if zoo is None and "/" in name:
        zoo, name = name.rsplit("/", 1)
    candidates = [_zoo_path(zoo, cache)] if zoo is not None else list_zoos(cache)
    found = [z for z in candidates if (z / "heads" / f"{name}.json").is_file()]
    if not found:
        where = ", ".join(str(z) for z in candidates) or f"no zoo built under {zoo_root(cache)}"
        raise ZooError(f"unknown task {name!r} (searched: {where})",
                       hint="build a zoo first (fusionlang zoo build text), or name it as ZOO/TASK")
    if len(found) > 1:  # a full zoo wins over its tiny test version
        full = [z for z in found if not z.name.endswith("-tiny")]
        found = full if len(full) == 1 else found
    if len(found) > 1:
        raise ZooError(f"task {name!r} is in several zoos: {', '.join(z.name for z in found)}",
                       hint="name it as ZOO/TASK")
    return find_task(found[0] / "heads" / f"{name}.json")


@functools.lru_cache(maxsize=32)
def _load_cached(source: str, kwargs_json: str, cache, fetch):
    from .data import load

    return load(source, **json.loads(kwargs_json), cache=cache, fetch=fetch)


def load_task_data(spec: TaskSpec, cache=None, fetch=None):
    """The task's data set, re-drawn from its recorded loader + arguments."""
    loader = spec.info["loader"]
    return _load_cached(loader["source"], json.dumps(loader["kwargs"], sort_keys=True), cache, fetch)


def _peak_mem_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _load_model(spec: TaskSpec, model, device: str):
    """A model (encoder) for ``spec``'s architecture from a dir, a state dict or a module."""
    if spec.kind == "text":
        from . import text as T

        if isinstance(model, (str, os.PathLike)):
            mdir = Path(model)
            if not (mdir / "config.json").is_file():
                raise ZooError(f"{mdir} is not a model directory (no config.json)")
            return T.load_encoder(mdir, device)
        if isinstance(model, Mapping):
            return T.encoder_from_state_dict(spec.base_dir, model, device)
        return model.to(device).eval()
    if spec.kind == "vision":
        from . import vision as V

        if isinstance(model, (str, os.PathLike)):
            return V.load_body(Path(model), device)
        if isinstance(model, Mapping):
            return V.body_from_state_dict(spec.base_dir, model, device)
        return model.to(device).eval()
    if spec.kind == "nets":
        from ..arch import nets as N

        try:
            if isinstance(model, Mapping):
                m = N.load(spec.base_dir)
                m.load_state_dict(dict(model), strict=False)
                return m.to(device)
            return N.load(Path(model), device) if isinstance(model, (str, os.PathLike)) else model.to(device).eval()
        except N.NetError as e:
            raise ZooError(e.message, hint=e.hint) from None
    raise ZooError(f"unknown task kind {spec.kind!r}")


def evaluate(
    model: str | os.PathLike | Mapping[str, Any] | Any,
    task: str | os.PathLike | TaskSpec,
    split: str = "test",
    device: str = "cpu",
    batch_size: int = 128,
    *,
    zoo: str | os.PathLike | None = None,
    cache=None,
    fetch: bool | None = None,
    dataset=None,
    limit: int | None = None,
    on_batch=None,
) -> dict:
    """Accuracy of ``model`` (+ the task's frozen head) on ``split`` of ``task``.

    Returns ``accuracy``, ``loss`` (mean cross-entropy in nats of the logits, softmax
    over the task's classes, against the labels: what the head was trained on),
    ``n`` (examples), ``correct``, ``latency_per_batch_s`` (mean
    wall time of one forward batch, tokenisation/preprocessing included),
    ``peak_mem_bytes`` (CUDA: peak allocated; CPU: the process's peak RSS),
    ``batches``, ``task``, ``split``. ``dataset`` overrides the task's data (tests).
    ``on_batch(done, total)``: called after each batch (progress), with batch counts.
    """
    import torch

    spec = task if isinstance(task, TaskSpec) else find_task(task, zoo, cache)
    ds = dataset if dataset is not None else load_task_data(spec, cache, fetch)
    data = ds.split(split)
    n = len(data) if limit is None else min(limit, len(data))
    weight, bias = spec.head()
    # an ensemble (fusionlang.eval.ensembles): every member's logits, combined
    ens = model if isinstance(model, Mapping) and "members" in model and "mode" in model else None
    encoders = [_load_model(spec, m["path"], device) for m in ens["members"]] if ens else [_load_model(spec, model, device)]
    weight, bias = weight.to(device), bias.to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    correct, loss_sum, times, batches = 0, 0.0, [], 0
    labels = torch.as_tensor(list(data.labels[:n]))
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            t0 = time.perf_counter()
            outs = []
            for encoder in encoders:
                if spec.kind == "text":
                    from . import text as T

                    batch = T.tokenize(_tokenizer(spec.base_dir), data.texts[start:stop],
                                       spec.info["max_length"], device)
                    feats = T.pool(encoder, batch, spec.info.get("pooling", "mean"),
                                   spec.info.get("normalize", True))
                elif spec.kind == "nets":  # the nets' own logits (the task's head is the identity)
                    from ..arch import nets as N

                    feats = encoder(N.prepare(data.images[start:stop], encoder.fusion_config, device))
                else:
                    from . import vision as V

                    feats = V.features(encoder, data.images[start:stop], spec.info, device)
                outs.append(feats.float() @ weight.T + bias)
            if ens:
                from ..ops.ensemble import combine

                logits = combine(outs, ens["weights"], ens["normalize"], ens["mode"])
            else:
                logits = outs[0]
            pred = logits.argmax(-1).cpu()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            correct += int((pred == labels[start:stop]).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits.float().cpu(), labels[start:stop],
                                                                reduction="sum"))
            batches += 1
            if on_batch is not None:
                on_batch(batches, -(-n // batch_size))
    return {
        "accuracy": correct / n if n else float("nan"),
        "loss": loss_sum / n if n else float("nan"),
        "n": n,
        "correct": correct,
        "latency_per_batch_s": sum(times) / len(times) if times else 0.0,
        "peak_mem_bytes": _peak_mem_bytes(device),
        "batches": batches,
        "batch_size": batch_size,
        "task": spec.name,
        "split": split,
    }


@functools.lru_cache(maxsize=8)
def _tokenizer(base_dir: Path):
    from . import text as T

    return T.load_tokenizer(base_dir)
