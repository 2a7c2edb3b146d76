"""Models with no transformers class of their own (SMILE, WEMoE): a transformers
base model in which some modules are replaced, saved as ordinary safetensors plus a
JSON description, and rebuilt by `fusionlang.load(dir)` with no remote code and no
pickle.

On disk (`DESCRIPTION` in the model directory):

    {"format": "fusionlang-model", "version": 1, "method": "smile",
     "class": "BertModel",                       # the base's transformers class
     "modules": {"encoder.layer.0.attention.self.query":
                    {"type": "smile_linear", "num_experts": 2, "k": 128, "gate_k": 1,
                     "top_k": 1, "bias": true}, ...}}

The base's own tensors keep their names (so the weights of the replaced modules'
pretrained part load into the base class as usual); each replaced module adds tensors
under its name (`<module>.smile_u`, ...: see the module type's class). The module
types are `_type`'s; each is built by a function (base module, its tensors, its spec,
a dict the modules of one model share)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

DESCRIPTION = "fusionlang_model.json"
FORMAT = "fusionlang-model"


def description(method: str, cls: str, modules: dict[str, dict]) -> dict:
    """The JSON description of an upscaled model (see the module docstring)."""
    return {"format": FORMAT, "version": 1, "method": method, "class": cls, "modules": modules}


def read_description(model_dir: str | os.PathLike) -> dict | None:
    """The directory's description, or None when it has none (a plain transformers
    model). Raises ValueError when the file is there but not a valid description."""
    p = Path(model_dir) / DESCRIPTION
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("modules"), dict):
        raise ValueError(f"{p} is not a fusionlang model description")
    return d


def linear_modules(config_json: str) -> tuple[str, ...]:
    """Names of the `torch.nn.Linear` modules of the model a config.json describes (the
    class its `architectures` names, else `AutoModel`), built on the meta device: the
    layers FusionBench's upscaling algorithms replace (`isinstance(m, nn.Linear)`).
    Raises ValueError when transformers cannot build the model from the config."""
    return tuple(n for n, (kind, _io) in weight_modules(config_json).items() if kind == "linear")


@functools.cache
def weight_modules(config_json: str) -> dict[str, tuple[str, bool]]:
    """The modules with a `weight` of the model a config.json describes (the class its
    `architectures` names, else `AutoModel`, built on the meta device), in module order:
    name -> (kind, io); kind "linear" (`nn.Linear`), "embedding" (`nn.Embedding`) or
    "other"; io whether it is the model's input or output embedding. Remembered in the
    cache directory per transformers version and config. Raises ValueError when
    transformers cannot build the model from the config."""
    import hashlib
    from importlib.metadata import version

    from ..zoo.paths import cache_dir

    key = hashlib.sha256(config_json.encode()).hexdigest()[:24]
    memo = cache_dir() / "arch" / f"weight-modules-transformers-{version('transformers')}-{key}.json"
    try:
        return {k: (v[0], bool(v[1])) for k, v in json.loads(memo.read_text()).items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        pass
    import torch

    model = build_empty(json.loads(config_json), device="meta")
    io = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    out = {}
    for n, m in model.named_modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            kind = "linear" if isinstance(m, torch.nn.Linear) else "embedding" if isinstance(m, torch.nn.Embedding) \
                else "other"
            out[n] = (kind, id(m) in io)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, memo)
    except OSError:
        pass  # an unwritable cache only costs the seconds again
    return out


def checkpoint_linears(modules: tuple[str, ...], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The Linear modules by the names their tensors have in the checkpoint (a module
    whose weight the checkpoint does not hold, e.g. a head tied to the embeddings, is
    not upscaled), in checkpoint order."""
    found = set()
    for m in modules:
        for cand in (m, m.split(".", 1)[1] if "." in m else None):
            if cand and len(shapes.get(f"{cand}.weight", ())) == 2:
                found.add(cand)
                break
    return [n.rsplit(".", 1)[0] for n in shapes if n.endswith(".weight") and n.rsplit(".", 1)[0] in found]


def model_class(config: dict):
    """The transformers class for a config.json dict: the one `architectures[0]` names
    when transformers has it, else None (use `AutoModel`). Never remote code."""
    import transformers

    archs = config.get("architectures") or []
    name = archs[0] if archs and isinstance(archs[0], str) else ""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    return cls if isinstance(cls, type) else None


def build_empty(config: dict, device: str = "meta"):
    """The model a config.json dict describes, with uninitialised weights on `device`.
    Raises ValueError when transformers cannot build it."""
    import torch
    import transformers

    try:
        cfg = transformers.AutoConfig.for_model(**config) if "model_type" in config else None
        if cfg is None:
            raise ValueError("config.json has no model_type")
        cls = model_class(config)
        with torch.device(device):
            return cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"transformers cannot build this model from its config: {e}") from None


def module_for_tensor_prefix(model, name: str):
    """The submodule of `model` whose tensors are saved under `name` (tolerating the
    base-model prefix, e.g. `bert.`, present in one and not the other); None if none."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for cand in (name, f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(prefix + ".") else None):
        if cand:
            try:
                return cand, model.get_submodule(cand)
            except AttributeError:
                continue
    return None, None


def read_tensors(model_dir: str | os.PathLike, names: set[str]) -> dict:
    """The tensors `names` from the directory's safetensors files (any sharding), via
    safetensors' own reader. Raises ValueError for a name no file holds."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                if k in names:
                    out[k] = fh.get_tensor(k)
    missing = names - set(out)
    if missing:
        raise ValueError(f"the model files lack {len(missing)} tensors of the description, e.g. {min(missing)}")
    return out


def load(model_dir: str | os.PathLike, desc: dict, cls=None, **kwargs):
    """Rebuild an upscaled model: the base class loads the base tensors (`from_pretrained`,
    `kwargs` passed on), then each described module is replaced by its type's module
    with its tensors. `cls`: the transformers class to load the base with (default: the
    description's `class`, else AutoModel). Returns the model in eval mode. Raises
    ValueError for an unknown module type, a module the base does not have, or missing
    tensors."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    if cls is None:
        cls = model_class({"architectures": [desc.get("class", "")]}) or transformers.AutoModel
    kwargs.setdefault("local_files_only", True)
    kwargs.setdefault("trust_remote_code", False)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the modules' own tensors are "unexpected" to the base class
    try:
        model = cls.from_pretrained(str(model_dir), **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    specs = desc["modules"]
    wanted = {f"{name}.{t}" for name, spec in specs.items() for t in _type(spec)[1](spec)}
    tensors = read_tensors(model_dir, wanted)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    shared: dict = {}  # what modules of one model share (a WEMoE MLP's routing weights)
    for name, spec in specs.items():
        path, base = module_for_tensor_prefix(model, name)
        if base is None:
            raise ValueError(f"the base model has no module '{name}' to upscale")
        build, names = _type(spec)
        own = {t: tensors[f"{name}.{t}"].to(device=base.weight.device, dtype=dtype) for t in names(spec)}
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, build(base, own, spec, shared))
    if shared:
        from .wemoe_module import capture_mask

        capture_mask(model, shared)
    return model.eval()


def _type(spec: dict):
    from .smile import SMILE_LINEAR, smile_linear, smile_tensor_names
    from .wemoe import WEMOE_LINEAR, wemoe_linear, wemoe_tensor_names

    types = {SMILE_LINEAR: (smile_linear, smile_tensor_names), WEMOE_LINEAR: (wemoe_linear, wemoe_tensor_names)}
    t = spec.get("type") if isinstance(spec, dict) else None
    if t not in types:
        raise ValueError(f"unknown module type {t!r} (this fusionlang knows: {', '.join(types)})")
    return types[t]


def from_pretrained(cls, model_dir: str | os.PathLike, **kwargs):
    """`cls.from_pretrained(model_dir, **kwargs)` for a plain transformers model, the
    upscaled model (`load`) when the directory has a description: the one entry point
    evaluation uses, so SMILE models are scored like any other. Errors as `load` and
    transformers."""
    desc = read_description(model_dir)
    if desc is None:
        return cls.from_pretrained(str(model_dir), **kwargs)
    return load(model_dir, desc, cls, **kwargs)
