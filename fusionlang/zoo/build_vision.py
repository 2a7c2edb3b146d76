"""Building a vision zoo: features and prototype heads, fine-tuned bodies, the
pre-trained and fine-tuned models evaluated (the vision counterpart of build._build_text)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from .errors import ZooError
from .heads import write_head
from .progress import bar
from .vision import embed, fine_tune, load_body, pretrained_body, save_body


def build_vision_tasks(recipe, out: Path, seed: int, cache, fetch, progress) -> dict:
    """The vision counterpart of build._build_text (same layout, same manifest fields)."""
    from .data import load
    from .evaluate import TaskSpec, evaluate
    from .text import prototype_head

    sizes = {t.max_length for t in recipe.tasks}
    if len(sizes) != 1:
        raise ZooError("all tasks of a vision zoo must use one image size")
    (size,) = sizes
    base = pretrained_body(size)
    save_body(base, out / "base")
    base = load_body(out / "base")
    overall = progress.add_task(f"zoo {recipe.name}", total=len(recipe.tasks))
    results = {}
    for task in recipe.tasks:
        t_task = time.perf_counter()
        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (data)")
        kwargs = task.loader_kwargs(seed)
        ds = load(task.source, **kwargs, cache=cache, fetch=fetch)
        with bar(progress, f"  {task.name}: features", len(ds.train)) as adv:
            feats = embed(base, ds.train.images, recipe.eval_batch_size, on_batch=adv)
        weight, bias = prototype_head(feats, ds.train.labels, ds.num_classes, recipe.head_scale)
        info = {
            "task": task.name, "zoo": recipe.name, "kind": "vision",
            "description": task.description, "class_names": list(ds.class_names),
            "head": "prototype", "scale": recipe.head_scale, "pooling": "avg",
            "normalize": True, "image_size": size, "source": ds.source,
            "loader": {"source": task.source, "kwargs": kwargs},
            "sizes": {s: len(ds.split(s)) for s in ("train", "val", "test")},
        }
        write_head(out / "heads", task.name, weight, bias, info)
        spec = TaskSpec(task.name, out, "vision", out / "heads" / f"{task.name}.safetensors", info)

        def ev(model, split, spec=spec, ds=ds):
            return evaluate(model, spec, split, batch_size=recipe.eval_batch_size, dataset=ds)

        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (evaluate pretrained)")
        pre_test, pre_val = ev(base, "test"), ev(base, "val")
        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (fine-tune)")
        expert = copy.deepcopy(base)
        t_ft = time.perf_counter()
        with bar(progress, f"  {task.name}: fine-tune", task.steps) as adv:
            losses = fine_tune(expert, weight, bias, ds.train.images, ds.train.labels,
                               steps=task.steps, lr=task.lr, batch_size=task.batch_size,
                               seed=seed, warmup=min(recipe.warmup, task.steps // 2),
                               on_step=lambda s, loss: adv(1))
        ft_seconds = time.perf_counter() - t_ft
        save_body(expert, out / task.name)
        del expert
        saved = load_body(out / task.name)  # evaluate what was written
        progress.update(overall, description=f"zoo {recipe.name}: {task.name} (evaluate fine-tuned)")
        ft_test, ft_val = ev(saved, "test"), ev(saved, "val")
        del saved
        results[task.name] = {
            "model": task.name, "head": f"heads/{task.name}.safetensors",
            "description": task.description, "source": ds.source,
            "classes": list(ds.class_names), "sizes": info["sizes"],
            "budget": {"steps": task.steps, "lr": task.lr, "batch_size": task.batch_size,
                       "image_size": size},
            "accuracy": {"pretrained": pre_test["accuracy"], "finetuned": ft_test["accuracy"]},
            "val_accuracy": {"pretrained": pre_val["accuracy"], "finetuned": ft_val["accuracy"]},
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "fine_tune_s": round(ft_seconds, 1),
            "task_s": round(time.perf_counter() - t_task, 1),
        }
        progress.log(f"{task.name}: pretrained {pre_test['accuracy']:.3f} -> fine-tuned "
                     f"{ft_test['accuracy']:.3f} ({ft_seconds:.0f}s fine-tuning)")
        progress.advance(overall, 1)
    progress.remove_task(overall)
    return results
