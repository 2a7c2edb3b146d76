"""A task head on disk: `heads/TASK.safetensors` (weight [classes, features], bias
[classes]) and `heads/TASK.json` (the task's description: classes, pooling, data)."""

from __future__ import annotations

import json
from pathlib import Path


def write_head(heads_dir: Path, task: str, weight, bias, info: dict) -> None:
    """Write a task head: float tensors weight [classes, features] and bias [classes], and its info."""
    from safetensors.torch import save_file

    heads_dir.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()},
              str(heads_dir / f"{task}.safetensors"), metadata={"format": "pt"})
    (heads_dir / f"{task}.json").write_text(json.dumps(info, indent=2) + "\n")
