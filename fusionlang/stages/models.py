"""Models as a stage runs them: a torch module whose parameters are named as the model
directory's tensors, a way to turn a batch of examples into its inputs, and its logits.

Which module a stage builds depends on the data value:
- zoo data: the zoo's architecture (text: the sentence encoder, mean-pooled and
  normalised; vision: the EfficientNet body, average-pooled and normalised) and, for
  logits, the frozen head of the data's task: the model as `eval` scores it.
- the user's files: the model's own transformers class from its config.json:
  `*ForSequenceClassification` (its logits are the model's own head) or the bare
  `AutoModel` (no logits: enough for Gram matrices, not for Fisher weights), with the
  tokenizer saved next to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import DataError, Examples


@dataclass
class StageModel:
    """`module`: the network (eval mode, float32). `names`: module parameter or module
    name -> the tensor name in the model directory's files. `inputs(examples, start,
    stop)`: the module's keyword inputs for rows [start, stop). `logits(inputs)`:
    [batch, classes] float32, or None when the model has no classification head.
    `lengths(examples)`: each row's number of tokens after truncation (text models), or
    None for inputs of one size (images)."""

    module: torch.nn.Module
    names: dict[str, str]
    inputs: Callable[[Examples, int, int], dict]
    run: Callable[[dict], Any]
    logits: Callable[[dict], torch.Tensor] | None
    lengths: Callable[[Examples], list[int]] | None = None


def by_length(sm: StageModel, ex: Examples) -> Examples:
    """`ex` with its rows in order of increasing token length (stable: equal lengths keep
    their order), so consecutive batches need little padding; `ex` itself when the model's
    inputs have no length (images) or the data holds no text."""
    if sm.lengths is None or ex.texts is None:
        return ex
    lens = sm.lengths(ex)
    order = sorted(range(len(ex)), key=lens.__getitem__)
    return dataclasses.replace(ex, texts=tuple(ex.texts[i] for i in order),
                               labels=tuple(ex.labels[i] for i in order) if ex.labels is not None else None)


def _token_lengths(tokenizer, max_length: int) -> Callable[[Examples], list[int]]:
    def lengths(ex: Examples) -> list[int]:
        ids = tokenizer(list(ex.texts), truncation=True, max_length=max_length)["input_ids"]
        return [len(x) for x in ids]
    return lengths


def read_config(model_dir: str) -> dict:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError("E011", f"cannot read {model_dir}/config.json: {e}", "a model directory needs a config.json") from None
    return config if isinstance(config, dict) else {}


def _zoo_task(data: dict):
    from ..zoo.errors import ZooError
    from ..zoo.evaluate import find_task

    try:
        return find_task(data["task"], data["zoo"])
    except ZooError as e:
        raise DataError("E018", e.message, e.hint or "", "task") from None


def check_fits(model_dir: str, data: dict, needs_logits: bool) -> None:
    """DataError (E014) when the model cannot run on the data value: another
    architecture than the zoo's, or no classification head where logits are needed."""
    config = read_config(model_dir)
    if data["kind"] == "zoo":
        task = _zoo_task(data)
        want = read_config(str(task.base_dir))
        mine = (config.get("model_type"), config.get("hidden_size"))
        theirs = (want.get("model_type"), want.get("hidden_size"))
        if mine != theirs:
            raise DataError("E014", f"'{os.path.basename(model_dir)}' is a {mine[0]} model but the data of task "
                            f"'{data['task']}' is read by {theirs[0]} models (the '{data['zoo']}' zoo's)",
                            "compute statistics on data of a zoo with the model's architecture, or on your own files")
        return
    archs = config.get("architectures") or []
    if needs_logits and not any(a.endswith(("ForSequenceClassification", "ForImageClassification")) for a in archs):
        raise DataError("E014", f"'{os.path.basename(model_dir)}' ({', '.join(archs) or config.get('model_type')}) "
                        "has no classification head, and Fisher weights come from the model's own predictions",
                        "use a model saved with its head (e.g. *ForSequenceClassification), or data of a zoo task")


def build(model_dir: str, data: dict, device: torch.device, meta: bool = False,
          module: torch.nn.Module | None = None) -> StageModel:
    """The stage module for `model_dir` on data value `data`; `meta`: structure only
    (parameters on the meta device, no weights read), for compile-time shapes;
    `module`: reuse this already loaded module (another data value's head on it)."""
    if read_config(model_dir).get("model_type") == "fusionlang-net":
        return _net(model_dir, data, device, meta, module)
    if data["kind"] == "zoo":
        task = _zoo_task(data)
        if task.kind == "text":
            return _zoo_text(model_dir, task, device, meta, module)
        return _zoo_vision(model_dir, task, device, meta, module)
    return _hf(model_dir, device, meta, module)


def _file_names(model_dir: str) -> set[str]:
    from ..runtime.sources import read_model_dir

    return set(read_model_dir(model_dir).tensors)


def name_map(module: torch.nn.Module, file_names: set[str], buffers: bool = False) -> dict[str, str]:
    """Module parameter names (with `buffers`, every state-dict entry, in module order) ->
    file tensor names: the same names, or the file's names with a common prefix added or
    removed (e.g. "bert." for a BertFor... checkpoint)."""
    params = list(module.state_dict()) if buffers else [n for n, _ in module.named_parameters()]
    best: dict[str, str] = {n: n for n in params if n in file_names}
    for n in params:
        cands = [f for f in file_names if f.endswith("." + n)]
        if len(cands) == 1:
            prefix = cands[0][: -len(n)]
            m = {p: prefix + p for p in params if prefix + p in file_names}
            if len(m) > len(best):
                best = m
            break
    for n in params:
        if "." in n:
            prefix = n.split(".")[0] + "."
            m = {p: p[len(prefix):] for p in params if p.startswith(prefix) and p[len(prefix):] in file_names}
            if len(m) > len(best):
                best = m
            break
    return best


def _zoo_text(model_dir: str, task, device, meta: bool, module=None) -> StageModel:
    from ..zoo import text as T

    T._quiet_transformers()
    from transformers import AutoConfig, AutoModel

    if module is not None:
        pass
    elif meta:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):
            module = AutoModel.from_config(config, add_pooling_layer=False)
    else:
        # NOTE: the pooler is not used by mean pooling: leaving it out keeps every
        # parameter of the stage module on the path to the logits
        module = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32,
                                           add_pooling_layer=False).to(device).eval()
    tokenizer = T.load_tokenizer(task.base_dir) if not meta else None
    info = task.info

    def inputs(ex: Examples, start: int, stop: int) -> dict:
        return T.tokenize(tokenizer, ex.texts[start:stop], info["max_length"], device)

    def run(batch: dict):
        return module(**batch)

    def logits(batch: dict) -> torch.Tensor:
        w, b = _head(task, device)
        feats = T.pool(module, batch, info.get("pooling", "mean"), info.get("normalize", True))
        return feats.float() @ w.T + b

    return StageModel(module, name_map(module, _file_names(model_dir)), inputs, run, logits,
                      _token_lengths(tokenizer, info["max_length"]) if tokenizer is not None else None)


def _head(task, device):
    w, b = task.head()
    return w.to(device), b.to(device)


def _zoo_vision(model_dir: str, task, device, meta: bool, module=None) -> StageModel:
    from ..zoo import vision as V

    if module is not None:
        pass
    elif meta:
        module = V.new_body(read_config(model_dir))
    else:
        module = V.load_body(model_dir, device).eval()
    info = task.info

    def inputs(ex: Examples, start: int, stop: int) -> dict:
        cfg = getattr(module, "fusion_config", None) or info
        return {"x": V.preprocess(ex.images[start:stop], cfg, device)}

    def run(batch: dict):
        return module.extract_features(batch["x"])

    def logits(batch: dict) -> torch.Tensor:
        w, b = _head(task, device)
        feats = V.pooled(module, batch["x"], info.get("normalize", True))
        return feats.float() @ w.T + b

    return StageModel(module, name_map(module, _file_names(model_dir)), inputs, run, logits)


def _net(model_dir: str, data: dict, device, meta: bool, module=None) -> StageModel:
    """A `fusionlang-net` (arch.nets): its inputs are the data's images, its logits its own."""
    from ..arch import nets as N

    config = read_config(model_dir)
    if module is None:
        try:
            module = N.build(config) if meta else N.load(model_dir, device)
        except N.NetError as e:
            raise DataError("E011", e.message, e.hint) from None
        if meta:
            module = module.to("meta")

    def inputs(ex: Examples, start: int, stop: int) -> dict:
        if ex.images is None:
            raise DataError("E014", f"'{os.path.basename(model_dir)}' reads images, and the data has none",
                            'name the image column: dataset("train.jsonl", image="image", label="label")', "image")
        return {"x": N.prepare(ex.images[start:stop], config, device)}

    def run(batch: dict):
        return module(batch["x"])

    return StageModel(module, {k: k for k, _ in module.named_parameters()}
                      | {k: k for k, _ in module.named_buffers() if not k.endswith("num_batches_tracked")},
                      inputs, run, lambda batch: module(batch["x"]).float())


def _hf(model_dir: str, device, meta: bool, module=None) -> StageModel:
    from ..zoo import text as T

    T._quiet_transformers()
    import transformers
    from transformers import AutoConfig

    config = read_config(model_dir)
    archs = config.get("architectures") or []
    cls_name = "AutoModel"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        cls_name = "AutoModelForSequenceClassification"
    elif any(a.endswith("ForImageClassification") for a in archs):
        cls_name = "AutoModelForImageClassification"
    cls = getattr(transformers, cls_name)
    if meta:
        with torch.device("meta"):
            module = cls.from_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
        tokenizer = processor = None
    else:
        if module is None:
            module = cls.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).to(device).eval()
        tokenizer = processor = None
        if cls_name == "AutoModelForImageClassification":
            processor = transformers.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    max_length = int(config.get("max_position_embeddings") or 512)

    def inputs(ex: Examples, start: int, stop: int) -> dict:
        if ex.texts is not None:
            if tokenizer is None:
                raise DataError("E014", f"'{os.path.basename(model_dir)}' is an image model but the data holds text",
                                "give image data (image=) to an image model")
            batch = tokenizer(list(ex.texts[start:stop]), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
        else:
            if processor is None:
                raise DataError("E014", f"'{os.path.basename(model_dir)}' is a text model but the data holds images",
                                "give text data (text=) to a text model")
            batch = processor(images=list(ex.images[start:stop]), return_tensors="pt")
        return {k: v.to(device) for k, v in batch.items()}

    def run(batch: dict):
        return module(**batch)

    logits = None
    if cls_name != "AutoModel":
        def logits(batch: dict) -> torch.Tensor:
            return module(**batch).logits.float()

    return StageModel(module, name_map(module, _file_names(model_dir)), inputs, run, logits,
                      _token_lengths(tokenizer, max_length) if tokenizer is not None else None)


class Bound(torch.nn.Module):
    """`fn(batch)` computed over `module`, as a module whose parameters are `module`'s
    (prefixed "inner."), so `torch.func.functional_call` can run `fn` with other tensors."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.inner = module
        self.fn = fn

    def forward(self, batch: dict):
        return self.fn(batch)


TOKENS_PER_PASS = 2048


def passes(batch: dict, max_tokens: int | None = None) -> Iterator[dict]:
    """A batch of inputs as consecutive slices of its rows, each with at most `max_tokens`
    (default TOKENS_PER_PASS) positions (rows × sequence length; at least one row), so a
    forward (and backward) pass over long sequences holds a bounded amount of activations
    (BERT-style attention keeps rows × heads × length² scores). Inputs without a sequence
    (images) come as one slice. Statistics summed over rows, and gradients of a loss
    summed over rows, are the same over the slices as over the whole batch."""
    max_tokens = max_tokens or TOKENS_PER_PASS
    ids = batch.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.numel() <= max_tokens:
        yield batch
        return
    step = max(1, max_tokens // ids.shape[1])
    for start in range(0, ids.shape[0], step):
        yield {k: v[start:start + step] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == ids.shape[0] else v
               for k, v in batch.items()}


def batches(ex: Examples, batch_size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of consecutive batches (the last one may be short)."""
    for start in range(0, len(ex), batch_size):
        yield start, min(len(ex), start + batch_size)
