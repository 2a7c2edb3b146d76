"""The alignment zoo (`fusionlang zoo build nets`): MLPs and CNNs with BatchNorm trained
from scratch on Fashion-MNIST (Debian `dataset-fashion-mnist`) from different seeds, so
that their hidden units are permuted relative to each other: the models that Git
Re-Basin / OT fusion align (docs/RESULTS.md, "Alignment").

Layout (as the other zoos): `mlp-s{K}/`, `cnn-s{K}/` (config.json of `arch.nets` +
model.safetensors), `base/` (a copy of mlp-s0, for tools that expect a base),
`heads/fashion.{json,safetensors}` (task kind "nets": the head is the identity, the nets'
logits are their own), `zoo.json`. Evaluation (`zoo.evaluate`, the `eval` statement,
`classify("fashion", zoo="nets")`) scores any directory of the same description.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..arch import nets as N
from .heads import write_head
from .progress import bar


def model_names(recipe) -> list[str]:
    return [f"mlp-s{s}" for s in recipe.mlp_seeds] + [f"cnn-s{s}" for s in recipe.cnn_seeds]


def config_for(recipe, name: str) -> dict:
    """The net description of zoo model `name` (mlp-sK or cnn-sK)."""
    cfg = N.mlp(list(recipe.mlp_widths)) if name.startswith("mlp") else N.cnn(list(recipe.cnn_channels))
    cfg["normalize"] = list(N.FASHION_NORMALIZE)
    return cfg


def train(cfg: dict, images, labels, epochs: int, lr: float, batch_size: int, seed: int, on_step=None):
    """A net trained from scratch: weights initialised and batches drawn from `seed`,
    Adam(lr), cross-entropy, BatchNorm in training mode, then its statistics re-estimated
    on the first 5,000 images (`precise_bn`). Returns the module (eval mode) and the mean
    loss of the last epoch."""
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = N.build(cfg).train()
    x = N.prepare(images, cfg)
    y = torch.as_tensor(list(labels))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    last = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        total, n = 0.0, 0
        for s in range(0, len(y), batch_size):
            idx = order[s:s + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
            if on_step:
                on_step()
        last = total / max(n, 1)
    precise_bn(model, x[: min(len(x), 5000)])
    return model.eval(), last


def precise_bn(model, x, batch_size: int = 500) -> None:
    """Re-estimate BatchNorm's running statistics as exact averages over the batches of
    `x` with the final weights ("precise BN"): the running averages of the last training
    steps lag behind the weights of a short training run."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            model(x[s:s + batch_size])
    for m in bns:
        m.momentum = 0.1


def score(model, images, labels, cfg: dict, batch_size: int = 500) -> dict:
    """{"accuracy", "loss"} (mean cross-entropy) of a net on images [N, 1, 28, 28] uint8."""
    import torch.nn.functional as F

    x, y = N.prepare(images, cfg), torch.as_tensor(list(labels))
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(y), batch_size):
            out = model(x[s:s + batch_size])
            correct += int((out.argmax(-1) == y[s:s + batch_size]).sum())
            loss += float(F.cross_entropy(out, y[s:s + batch_size], reduction="sum"))
    return {"accuracy": correct / len(y), "loss": loss / len(y)}


def build_nets_tasks(recipe, out: Path, seed: int, cache, fetch, progress) -> dict:
    """Train and save every net of the recipe; the zoo's task entry (zoo.json "tasks")."""
    from .data import load

    (task,) = recipe.tasks
    kwargs = task.loader_kwargs(seed)
    ds = load(task.source, **kwargs, cache=cache, fetch=fetch)
    info = {"task": task.name, "zoo": recipe.name, "kind": "nets", "description": task.description,
            "class_names": list(ds.class_names), "head": "identity", "image_size": 28, "source": ds.source,
            "loader": {"source": task.source, "kwargs": kwargs},
            "sizes": {s: len(ds.split(s)) for s in ("train", "val", "test")}}
    k = len(ds.class_names)
    write_head(out / "heads", task.name, torch.eye(k), torch.zeros(k), info)
    models = {}
    t0 = time.perf_counter()
    for name in model_names(recipe):
        cfg = config_for(recipe, name)
        mlp = name.startswith("mlp")
        epochs = task.steps if mlp else recipe.cnn_epochs
        rows = len(ds.train) if mlp or recipe.cnn_train_rows is None else min(len(ds.train), recipe.cnn_train_rows)
        s = int(name.rsplit("-s", 1)[1])
        steps = epochs * -(-rows // task.batch_size)
        t1 = time.perf_counter()
        with bar(progress, f"  {name}: train", steps) as adv:
            model, loss = train(cfg, ds.train.images[:rows], ds.train.labels[:rows], epochs, task.lr,
                                task.batch_size, seed * 1000 + s, on_step=lambda: adv(1))
        N.save(model, cfg, out / name)
        saved = N.load(out / name)  # score what was written
        test = score(saved, ds.test.images, ds.test.labels, cfg, recipe.eval_batch_size)
        val = score(saved, ds.val.images, ds.val.labels, cfg, recipe.eval_batch_size)
        models[name] = {"test": test, "val": val, "final_train_loss": round(loss, 4), "epochs": epochs,
                        "train_rows": rows,
                        "train_s": round(time.perf_counter() - t1, 1)}
        progress.log(f"{name}: test accuracy {test['accuracy']:.4f} ({models[name]['train_s']:.0f}s)")
    shutil.copytree(out / model_names(recipe)[0], out / "base")
    accs = [m["test"]["accuracy"] for m in models.values()]
    return {task.name: {"model": None, "head": f"heads/{task.name}.safetensors", "description": task.description,
                        "source": ds.source, "classes": list(ds.class_names), "sizes": info["sizes"],
                        "models": models, "accuracy": {"pretrained": None, "finetuned": sum(accs) / len(accs)},
                        "train_s": round(time.perf_counter() - t0, 1)}}
