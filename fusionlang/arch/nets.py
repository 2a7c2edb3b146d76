"""Small sequential networks described as data: the models of the alignment zoo
(`zoo.nets`) and of the alignment tests.

A model directory holds `config.json` with `model_type: "fusionlang-net"` and a list of
layers, and `model.safetensors` with the tensors `net.{i}.{weight,bias,running_mean,
running_var}` of layer i (a `torch.nn.Sequential` in that order):

    {"model_type": "fusionlang-net", "input_shape": [1, 28, 28], "num_labels": 10,
     "layers": [{"type": "flatten"}, {"type": "linear", "in": 784, "out": 512},
                {"type": "relu"}, {"type": "linear", "in": 512, "out": 10}]}

Layer types: `linear` (in, out, bias=true), `conv` (in, out, kernel, stride=1,
padding=0, bias=true), `bn` (num; BatchNorm2d after a conv, BatchNorm1d after a
linear), `relu`, `maxpool` (kernel), `gap` (global average pooling to 1×1), `flatten`.
The last linear layer's outputs are the logits. BatchNorm's `num_batches_tracked`
counters are not stored. `arch.permutation` derives which axes of these tensors can be
permuted from the same list.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

MODEL_TYPE = "fusionlang-net"
PARAMETRIC = ("linear", "conv", "bn")


class NetError(ValueError):
    """A net description that cannot be built (message, hint)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


def mlp(widths: list[int], input_shape=(1, 28, 28), num_labels: int = 10) -> dict:
    """The description of an MLP: flatten, then Linear+ReLU per hidden width, then a
    Linear to `num_labels` logits."""
    d_in = 1
    for s in input_shape:
        d_in *= int(s)
    layers: list[dict] = [{"type": "flatten"}]
    for w in widths:
        layers += [{"type": "linear", "in": d_in, "out": int(w)}, {"type": "relu"}]
        d_in = int(w)
    layers.append({"type": "linear", "in": d_in, "out": num_labels})
    return {"model_type": MODEL_TYPE, "input_shape": list(input_shape), "num_labels": num_labels, "layers": layers}


def cnn(channels: list[int], input_shape=(1, 28, 28), num_labels: int = 10, pool_every: int = 1) -> dict:
    """The description of a small CNN: per entry of `channels`, conv 3×3 (padding 1,
    no bias) + BatchNorm + ReLU (+ 2×2 max-pooling every `pool_every` blocks); then global
    average pooling, flatten and a Linear to `num_labels` logits."""
    c_in = int(input_shape[0])
    layers: list[dict] = []
    for i, c in enumerate(channels):
        layers += [{"type": "conv", "in": c_in, "out": int(c), "kernel": 3, "padding": 1, "bias": False},
                   {"type": "bn", "num": int(c)}, {"type": "relu"}]
        if (i + 1) % pool_every == 0 and i + 1 < len(channels):
            layers.append({"type": "maxpool", "kernel": 2})
        c_in = int(c)
    layers += [{"type": "gap"}, {"type": "flatten"}, {"type": "linear", "in": c_in, "out": num_labels}]
    return {"model_type": MODEL_TYPE, "input_shape": list(input_shape), "num_labels": num_labels, "layers": layers}


def build(config: dict):
    """A `torch.nn.Sequential` (float32, eval mode) for a net description; parameters
    and buffers named `net.{i}.*` as in the files. Raises NetError for an unknown layer."""
    from torch import nn

    mods = []
    prev = None
    for i, layer in enumerate(config.get("layers", [])):
        t = layer.get("type")
        if t == "linear":
            m = nn.Linear(int(layer["in"]), int(layer["out"]), bias=bool(layer.get("bias", True)))
        elif t == "conv":
            m = nn.Conv2d(int(layer["in"]), int(layer["out"]), int(layer["kernel"]), int(layer.get("stride", 1)),
                          int(layer.get("padding", 0)), bias=bool(layer.get("bias", True)))
        elif t == "bn":
            m = (nn.BatchNorm1d if prev == "linear" else nn.BatchNorm2d)(int(layer["num"]))
        elif t == "relu":
            m = nn.ReLU()
        elif t == "maxpool":
            m = nn.MaxPool2d(int(layer["kernel"]))
        elif t == "gap":
            m = nn.AdaptiveAvgPool2d(1)
        elif t == "flatten":
            m = nn.Flatten()
        else:
            raise NetError(f"layer {i} of the net has an unknown type {t!r}",
                           "types: linear, conv, bn, relu, maxpool, gap, flatten")
        mods.append(m)
        if t in PARAMETRIC:
            prev = t
    return nn.Sequential(OrderedDict(net=nn.Sequential(*mods))).eval()


def state_for_files(module) -> dict:
    """The module's tensors as the files store them (no `num_batches_tracked`)."""
    return {k: v.detach().contiguous() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def save(module, config: dict, out_dir: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` of a net to `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    save_file(state_for_files(module), str(out / "model.safetensors"))
    return out


def load(model_dir: str | Path, device="cpu"):
    """The module of a saved net (eval mode). Raises NetError when the directory is not one."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise NetError(f"cannot read {d}/config.json: {e}", "a net directory holds config.json") from None
    if config.get("model_type") != MODEL_TYPE:
        raise NetError(f"{d} is not a {MODEL_TYPE} model", f"its model_type is {config.get('model_type')!r}")
    module = build(config)
    state = {}
    for f in sorted(d.glob("*.safetensors")):
        state.update(load_file(str(f)))
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the description's
        raise NetError(f"the tensors in {d} do not fit its config.json: {str(e).splitlines()[-1].strip()}",
                       "re-create the model directory") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise NetError(f"the tensors in {d} do not fit its config.json (missing {missing[:3]}, unexpected "
                       f"{list(unexpected)[:3]})", "re-create the model directory")
    module.fusion_config = config
    return module.to(device).eval()


FASHION_NORMALIZE = (0.286, 0.353)  # Fashion-MNIST's pixel mean and standard deviation (of x/255)


def prepare(images, config: dict, device="cpu"):
    """A float32 batch [N, *input_shape] from images: a uint8 array [N, C, H, W] (zoo
    data) or a list of PIL images (the user's files: converted to grey or RGB as the
    input's channels ask, resized to H×W); x/255, then (x - mean)/std with the config's
    `normalize` [mean, std] when it has one."""
    import numpy as np
    import torch

    c, h, w = (int(s) for s in config["input_shape"])
    if isinstance(images, np.ndarray):
        x = torch.tensor(np.asarray(images), dtype=torch.float32)
    else:
        arrs = [np.asarray(im.convert("L" if c == 1 else "RGB").resize((w, h))) for im in images]
        x = torch.from_numpy(np.stack(arrs)).float()
        x = x[:, None] if c == 1 else x.permute(0, 3, 1, 2)
    x = x.reshape(len(x), c, h, w) / 255.0
    if config.get("normalize"):
        mean, std = config["normalize"]
        x = (x - float(mean)) / float(std)
    return x.to(device)
