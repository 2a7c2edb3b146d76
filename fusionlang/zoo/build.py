"""Build a zoo: base model + one fine-tuned expert and one frozen head per task.

Layout of ``<cache>/zoo/<name>/``::

    base/                  HF model dir (config.json, model.safetensors, tokenizer files)
    <task>/                the fine-tuned expert: same architecture and tensor names
    heads/<task>.safetensors   frozen linear head: weight [C, D], bias [C]
    heads/<task>.json      class names, pooling, max_length, data source + loader args
    zoo.json               manifest: tasks, seed, recipe, accuracies, build time

The zoo is built in a temporary directory and renamed into place at the end: an
interrupted build never leaves a zoo that looks complete. Everything is drawn from
``seed`` (splits, batch order, dropout), so a rebuild with the same seed, the same
package versions and the same thread count writes the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

from .errors import ZooError
from .heads import write_head
from .paths import zoo_dir
from .progress import bar
from .recipes import ZooRecipe, get_recipe

FORMAT_VERSION = 1


class NullProgress:
    """The subset of ``rich.progress.Progress`` that the builder uses, doing nothing."""

    def add_task(self, description, total=None, **kw):
        return 0

    def advance(self, task_id, advance=1):
        pass

    def update(self, task_id, **kw):
        pass

    def remove_task(self, task_id):
        pass

    def log(self, *args, **kw):
        pass


def _recipe_dict(recipe: ZooRecipe) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def build_zoo(
    name: str,
    seed: int = 0,
    tiny: bool = False,
    cache=None,
    fetch: bool | None = None,
    force: bool = False,
    progress=None,
    command: str | None = None,
    tasks=None,
    threads: int | None = None,
) -> Path:
    """Build (or reuse, if already built with the same recipe and seed) a zoo.

    ``tasks``: build only these tasks of the recipe (the zoo keeps its name).
    ``threads``: torch CPU threads (default: ``$FUSIONLANG_THREADS``, else the cores
    that the load average leaves idle, at least 1)."""
    recipe = get_recipe(name, tiny).select(tasks)
    out = zoo_dir(recipe.name, cache)
    manifest_path = out / "zoo.json"
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("seed") == seed and old.get("recipe") == _recipe_dict(recipe) \
                and old.get("format_version") == FORMAT_VERSION:
            return out
    progress = progress or NullProgress()
    from .requirements import ensure_all

    ensure_all(recipe, cache, fetch)  # fail fast, naming the install command
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{recipe.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(choose_threads(threads))
    try:
        if recipe.kind == "text":
            tasks = _build_text(recipe, tmp, seed, cache, fetch, progress)
        elif recipe.kind == "vision":
            from .build_vision import build_vision_tasks

            tasks = build_vision_tasks(recipe, tmp, seed, cache, fetch, progress)
        elif recipe.kind == "nets":
            from .nets import build_nets_tasks

            tasks = build_nets_tasks(recipe, tmp, seed, cache, fetch, progress)
        elif recipe.kind == "llm":
            from .llm import build_llm_tasks

            tasks = build_llm_tasks(recipe, tmp, seed, cache, fetch, progress)
        else:
            raise ZooError(f"unknown zoo kind {recipe.kind!r}")
        manifest = _manifest(recipe, seed, tasks, time.perf_counter() - t0, command)
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old_dir = out.parent / f".{recipe.name}.old-{os.getpid()}"
            out.rename(old_dir)
            tmp.rename(out)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        torch.set_num_threads(old_threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def choose_threads(threads: int | None = None) -> int:
    """Explicit > $FUSIONLANG_THREADS > idle cores. Oversubscribed OpenMP threads spin
    against other processes: on a busy 2-core machine 2 threads run ~10x slower than 1."""
    if threads:
        return max(1, int(threads))
    env = os.environ.get("FUSIONLANG_THREADS")
    if env:
        return max(1, int(env))
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _manifest(recipe: ZooRecipe, seed: int, tasks: dict, seconds: float, command) -> dict:
    import torch

    def mean(key):  # an LLM zoo's tasks have perplexities instead
        vals = [t["accuracy"].get(key) for t in tasks.values() if "accuracy" in t]
        vals = [v for v in vals if v is not None]  # the nets zoo has no pretrained model
        return sum(vals) / len(vals) if vals else None

    return {
        "format_version": FORMAT_VERSION,
        "name": recipe.name,
        "kind": recipe.kind,
        "base": "base",
        "base_source": recipe.base,
        "seed": seed,
        "tasks": tasks,
        "mean_accuracy": {"pretrained": mean("pretrained"), "finetuned": mean("finetuned")},
        "build_time_s": round(seconds, 1),
        "command": command or f"fusionlang zoo build {recipe.tiny_of or recipe.name} --seed {seed}"
        + (" --tiny" if recipe.tiny_of else ""),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "recipe": _recipe_dict(recipe),
    }


def _build_text(recipe: ZooRecipe, out: Path, seed: int, cache, fetch, progress) -> dict:
    import torch

    from . import text as T
    from .data import load
    from .evaluate import TaskSpec, evaluate

    src = T.pretrained_minilm_dir()
    tokenizer = T.load_tokenizer(src)
    base = T.load_encoder(src)
    T.save_encoder(base, src, out / "base")
    base = T.load_encoder(out / "base")  # exactly what users get
    overall = progress.add_task(f"zoo {recipe.name}", total=len(recipe.tasks))
    results = {}
    for task in recipe.tasks:
        t_task = time.perf_counter()
        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (data)")
        kwargs = task.loader_kwargs(seed)
        ds = load(task.source, **kwargs, cache=cache, fetch=fetch)
        L = task.max_length
        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (head)")
        with bar(progress, f"  {task.name}: features", len(ds.train)) as adv:
            feats = T.embed(base, tokenizer, ds.train.texts, L, recipe.eval_batch_size,
                            on_batch=adv)
        weight, bias = T.prototype_head(feats, ds.train.labels, ds.num_classes, recipe.head_scale)
        info = {
            "task": task.name,
            "zoo": recipe.name,
            "kind": "text",
            "description": task.description,
            "class_names": list(ds.class_names),
            "head": "prototype",
            "scale": recipe.head_scale,
            "pooling": "mean",
            "normalize": True,
            "max_length": L,
            "source": ds.source,
            "loader": {"source": task.source, "kwargs": kwargs},
            "sizes": {s: len(ds.split(s)) for s in ("train", "val", "test")},
        }
        write_head(out / "heads", task.name, weight, bias, info)
        spec = TaskSpec(task.name, out, "text", out / "heads" / f"{task.name}.safetensors", info)

        def ev(model, split, spec=spec, ds=ds):
            return evaluate(model, spec, split, batch_size=recipe.eval_batch_size, dataset=ds)

        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (evaluate pretrained)")
        pre_test, pre_val = ev(base, "test"), ev(base, "val")
        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (fine-tune)")
        expert = copy.deepcopy(base)
        t_ft = time.perf_counter()
        with bar(progress, f"  {task.name}: fine-tune", task.steps) as adv:
            losses = T.fine_tune(
                expert, tokenizer, weight, bias, ds.train.texts, ds.train.labels,
                steps=task.steps, lr=task.lr, batch_size=task.batch_size, max_length=L,
                seed=seed, warmup=min(recipe.warmup, task.steps // 2),
                on_step=lambda step, loss: adv(1),
            )
        ft_seconds = time.perf_counter() - t_ft
        T.save_encoder(expert, src, out / task.name)
        del expert
        saved = T.load_encoder(out / task.name)  # evaluate what was written
        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (evaluate fine-tuned)")
        ft_test, ft_val = ev(saved, "test"), ev(saved, "val")
        del saved
        results[task.name] = {
            "model": task.name,
            "head": f"heads/{task.name}.safetensors",
            "description": task.description,
            "source": ds.source,
            "classes": list(ds.class_names),
            "sizes": info["sizes"],
            "budget": {"steps": task.steps, "lr": task.lr, "batch_size": task.batch_size,
                       "max_length": L},
            "accuracy": {"pretrained": pre_test["accuracy"], "finetuned": ft_test["accuracy"]},
            "val_accuracy": {"pretrained": pre_val["accuracy"], "finetuned": ft_val["accuracy"]},
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "fine_tune_s": round(ft_seconds, 1),
            "task_s": round(time.perf_counter() - t_task, 1),
        }
        progress.log(
            f"{task.name}: pretrained {pre_test['accuracy']:.3f} -> fine-tuned "
            f"{ft_test['accuracy']:.3f} ({ft_seconds:.0f}s fine-tuning)"
        )
        progress.advance(overall, 1)
        torch.set_grad_enabled(True)
    progress.remove_task(overall)
    return results
