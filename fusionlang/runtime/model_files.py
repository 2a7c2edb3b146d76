"""What travels with an output besides its weights: config.json (with the output's
layer count and dtype), the tokenizer / processor files, custom model code, the
sentence-transformers modules, and a model card that marks the directory as a
fusionlang output."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..plan.graph import OutputSpec, Plan

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
                   "preprocessor_config.json", "chat_template.jinja",
                   # sentence-transformers: the module list and the pooling/normalize modules
                   "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def finish_output(plan: Plan, o: OutputSpec, d: Path) -> None:
    """Write into directory `d` everything of output `o` but its weights: config.json
    from the reference input with the output's overrides and dtype, the reference's
    companion files and modules, an upscaled model's description, and the model card."""
    src = plan.sources[o.reference]
    from ..arch.lora import CONFIG_FILE, is_adapter

    if is_adapter(o.description):  # a PEFT adapter: its config and a card, no model files
        (d / CONFIG_FILE).write_text(json.dumps(o.description["adapter_config"], indent=2) + "\n")
        (d / "README.md").write_text(model_card(plan, o, src, {}, "peft"))
        return
    config = dict(src.config)
    config.update(o.config_overrides)
    if o.dtype:
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[o.dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
        if "torch_dtype" not in config and "dtype" not in config:
            config["torch_dtype"] = name
    if config:
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in _companion_files(Path(src.path), "auto_map" in config):
        if o.tokenizer and f != "generation_config.json" and (f.startswith(("tokenizer", "vocab", "merges", "added_tokens",
                                                                             "special_tokens"))
                                                             or f.endswith((".model", ".tiktoken"))):
            continue  # the merged vocabulary's tokenizer is written below
        shutil.copy2(Path(src.path) / f, d / f)
    if o.tokenizer:
        from ..arch.vocab import build

        build(o.tokenizer)[0].save_pretrained(str(d))
    for m in _sentence_transformer_modules(Path(src.path)):
        shutil.copytree(Path(src.path) / m, d / m)
    if (Path(src.path) / "additional_chat_templates").is_dir():
        shutil.copytree(Path(src.path) / "additional_chat_templates", d / "additional_chat_templates")
    if o.description:  # an upscaled model (SMILE): what `fusionlang.load` rebuilds it from
        from ..arch.upscaled import DESCRIPTION

        (d / DESCRIPTION).write_text(json.dumps(o.description, indent=1) + "\n")
    (d / "README.md").write_text(model_card(plan, o, src, config))


def model_card(plan: Plan, o: OutputSpec, src, config: dict, library: str | None = None) -> str:
    """The output's README.md: Hugging Face metadata (`base_model`: the hub ids of the
    inputs that have one, `library_name`, `tags` with `fusionlang`, which marks the
    directory as a fusionlang output) and the spec it was merged with."""
    bases = []
    for s in [src, *(s for s in plan.sources.values() if not s.stage)]:
        hub = _hub_id(s.path)
        if hub and hub not in bases:
            bases.append(hub)
    lib = library or ("sentence-transformers" if (Path(src.path) / "modules.json").is_file() else "transformers")
    meta = ["---"]
    if bases:
        meta += ["base_model:", *(f"- {b}" for b in bases)]
    meta += [f"library_name: {lib}", "tags: [fusionlang, merge" + (", lora]" if library == "peft" else "]"), "---"]
    fence = "```"
    while fence in plan.spec_text:
        fence += "`"
    return ("\n".join(meta) + f"\n# {o.name}\n\nMerged with fusionlang from `{os.path.basename(plan.spec_file)}`:"
            f"\n\n{fence}fuse\n{plan.spec_text.rstrip()}\n{fence}\n")


_COMPANION = re.compile(r"^(tokenizer.*|vocab.*|merges\.txt|.*\.model|.*\.tiktoken|added_tokens\.json|"
                        r"special_tokens_map\.json|chat_template.*|bpe\.codes|.*\.spm|(generation|preprocessor|processor|"
                        r"video_preprocessor|feature_extractor|image_processor)_config\.json)$")


def _companion_files(model_dir: Path, custom_code: bool) -> list[str]:
    """The files next to a model's weights that travel with a merge of it: everything
    transformers' tokenizer / processor loading reads (TOKENIZER_FILES and the patterns
    of _COMPANION: `tokenizer.model`, `*.tiktoken`, `chat_template.jinja`, ...), the
    sentence-transformers configs, and with `custom_code` (an `auto_map` in config.json)
    the model's `.py` files."""
    try:
        names = sorted(os.listdir(model_dir))
    except OSError:
        return []
    out = []
    for f in names:
        if not (model_dir / f).is_file() or f.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json")):
            continue
        if f in TOKENIZER_FILES or _COMPANION.match(f) or (custom_code and f.endswith(".py")):
            out.append(f)
    return out


def _hub_id(path: str) -> str | None:
    """The Hugging Face hub id of a model directory in the hub cache
    (`models--org--name/snapshots/...`); None for a local model (its config's
    `_name_or_path` is often a local path and is not trusted)."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", path.replace(os.sep, "/"))
    return f"{m[1]}/{m[2]}" if m else None


def _sentence_transformer_modules(model_dir: Path) -> list[str]:
    """Module directories (pooling, normalize, dense, ...) that a sentence-transformers
    modules.json lists next to the transformer weights; they hold no merged weights."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        paths = [m.get("path", "") for m in modules if isinstance(m, dict)]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    return [p for p in paths if p and "/" not in p and ".." not in p and (model_dir / p).is_dir()
            and not any((model_dir / p).glob("*.safetensors"))]
