"""Model sources: local directories, the local Hugging Face cache, built zoos and
directories shipped inside installed Python packages.

Reads only safetensors *headers* (a JSON prefix of each file), never weights, and never
imports torch: `fusionlang check` and `compile` stay fast.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

# Safetensors dtype names -> bytes per element.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SourceError(Exception):
    """A problem with model files; the caller attaches the span of the source expression."""

    def __init__(self, code: str, message: str, hint: str = ""):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # absolute path of the shard holding it

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelHeader:
    """What compile time knows about a model: its directory, config and tensor headers."""

    path: str
    config: dict = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        text = self.config.get("text_config")
        if isinstance(text, dict) and isinstance(text.get("num_hidden_layers"), int):
            return text["num_hidden_layers"]
        return None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one file's header; raises SourceError (E011) if it is not valid safetensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError("E011", f"'{path}' is not a safetensors file (too short)",
                                  "the file is truncated or corrupt; re-create or re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise SourceError("E011", f"'{path}' has a corrupt safetensors header (length {n})",
                                  "the file is truncated or not a safetensors file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise SourceError("E011", f"cannot read '{path}': {e.strerror}", "check the file's permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceError("E011", f"'{path}' has a corrupt safetensors header (not JSON)",
                          "the file is truncated or not a safetensors file") from None
    if not isinstance(header, dict):
        raise SourceError("E011", f"'{path}' has a corrupt safetensors header (a JSON {type(header).__name__}, not an object)",
                          "the file is corrupt or not a safetensors file; re-create or re-download it")
    out: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
                raise TypeError("data_offsets")
        except (KeyError, TypeError, ValueError):
            raise SourceError("E011", f"'{path}': corrupt header entry for tensor '{name}'",
                              "each tensor entry needs dtype, shape and data_offsets; the file is corrupt, "
                              "re-create or re-download it") from None
        ti = TensorInfo(dtype, shape, str(path))
        if end - start != ti.nbytes or end > data_len:
            raise SourceError("E011", f"'{path}': tensor '{name}' points outside the file (truncated?)",
                              "the file is truncated; re-create or re-download it")
        out[name] = ti
    used = max((t.nbytes for t in out.values()), default=0) and max(
        header[k]["data_offsets"][1] for k in out)
    if used != data_len:
        raise SourceError("E011", f"'{path}' has {data_len - used} bytes after its last tensor (truncated or corrupt?)",
                          "safetensors files end with their last tensor; re-create or re-download it")
    return out


def read_model_dir(path: str | os.PathLike) -> ModelHeader:
    """Header of a model directory: config.json + model.safetensors or a sharded index."""
    d = Path(path)
    if not d.exists():
        raise SourceError("E010", f"model directory '{d}' does not exist",
                          "check the path (relative paths are relative to the spec file)")
    if not d.is_dir():
        raise SourceError("E010", f"'{d}' is not a directory", "local() takes a model directory")
    config: dict = {}
    cfg = d / "config.json"
    if cfg.exists():
        try:
            config = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SourceError("E011", f"'{cfg}' is not valid JSON: {e}", "fix or re-create config.json") from None
    index = d / "model.safetensors.index.json"
    files: list[Path]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise SourceError("E011", f"'{index}' is not a valid safetensors index",
                              "the index needs a \"weight_map\" object of tensor name -> shard file; "
                              "re-create or re-download it") from None
        files = sorted({d / f for f in weight_map.values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        has_bin = any(d.glob("*.bin")) or any(d.glob("*.pt"))
        raise SourceError(
            "E011", f"no safetensors weights in '{d}'",
            "convert pickle checkpoints to safetensors first (pickle is not loaded for safety)"
            if has_bin else "a model directory needs config.json and *.safetensors files",
        )
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        if not f.exists():
            raise SourceError("E011", f"shard '{f.name}' listed in the index is missing from '{d}'",
                              "the model directory is incomplete; copy or re-download the missing shard")
        tensors.update(read_safetensors_header(f))
    return ModelHeader(str(d.resolve()), config, tensors)


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"


_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def valid_hf_repo_id(repo: str) -> bool:
    return bool(_REPO_RE.match(repo))


def resolve_hf(repo: str, revision: str | None = None) -> Path:
    """Find a snapshot of `repo` in the local HF cache; never touches the network."""
    if not valid_hf_repo_id(repo):
        raise SourceError("E006", f"'{repo}' is not a Hugging Face repository id",
                          "expected 'org/name' (letters, digits, '-', '_' and '.')")
    cache = hf_cache_dir()
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    if not repo_dir.is_dir():
        raise SourceError(
            "E017", f"'{repo}' is not in the local Hugging Face cache ({repo_dir})",
            "fusionlang never downloads: fetch it once with `huggingface-cli download "
            f"{repo}` on a connected machine, or use local(\"dir\")",
        )
    rev = revision or "main"
    ref = repo_dir / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        cands = sorted(p.name for p in (repo_dir / "snapshots").glob(f"{commit}*")) if (repo_dir / "snapshots").is_dir() else []
        if len(cands) == 1:
            snap = repo_dir / "snapshots" / cands[0]
        else:
            have = sorted(p.name[:10] for p in (repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
            raise SourceError("E017", f"revision '{rev}' of '{repo}' is not in the local cache ({repo_dir})",
                              f"cached snapshots: {', '.join(have) or 'none'}")
    return snap


SOURCE_BUILTINS = ("local", "hf", "zoo", "package")


def is_source_call(e) -> bool:
    """Is this IR expression a model source: local(), hf(), zoo() or package()?"""
    return getattr(e, "kind", None) == "builtin" and getattr(e, "target", None) in SOURCE_BUILTINS


def zoo_model_dir(zoo: str, model: str) -> str:
    from .zoo.paths import zoo_dir

    d = zoo_dir(zoo)
    if not (d / "zoo.json").is_file():
        raise SourceError("E018", f"the '{zoo}' zoo is not built (looked in {d})",
                          f"build it once, offline: fusionlang zoo build {zoo}")
    if not (d / model).is_dir():
        have = sorted(p.name for p in d.iterdir() if (p / "config.json").is_file())
        raise SourceError("E006", f"the '{zoo}' zoo has no model '{model}'", f"its models: {', '.join(have)}")
    return str(d / model)


def package_model_dir(package: str, path: str = "") -> str:
    """A model directory inside an installed Python package (found, not imported)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package) if package.isidentifier() or "." in package else None
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise SourceError("E010", f"Python package '{package}' is not installed",
                          f"install it into this environment, e.g. pip install {package.replace('_', '-')} "
                          "(package() takes the import name)")
    d = os.path.join(roots[0], path)
    if not os.path.isdir(d):
        inside = sorted(p.name for p in Path(roots[0]).iterdir() if p.is_dir() and not p.name.startswith("__"))
        raise SourceError("E010", f"package '{package}' has no directory '{path}'",
                          f"directories in {roots[0]}: {', '.join(inside) or 'none'}")
    return d


def source_dir(target: str, args: dict, spec_file: str) -> str:
    """The model directory of a source call (SourceError when it cannot be located)."""
    if target == "local":
        return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(spec_file)), args["path"]))
    if target == "zoo":
        return zoo_model_dir(args["zoo"], args.get("model", "base"))
    if target == "package":
        return package_model_dir(args["package"], args.get("path") or "")
    return str(resolve_hf(args["repo"], args.get("revision")))
