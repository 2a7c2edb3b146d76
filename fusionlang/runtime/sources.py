"""Model sources: local directories, the local Hugging Face cache, built zoos and
directories shipped inside installed Python packages.

Reads only safetensors *headers* (a JSON prefix of each file), never weights, and never
imports torch: `fusionlang check` and `compile` stay fast.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
# Safetensors dtype names -> bytes per element: the dtypes fusionlang reads and writes
# (the executor maps each to a torch dtype). fp8 tensors are computed in float32 like
# every other input.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# Floating-point dtypes: merged in float32 and cast back (integer and bool buffers pass through).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Every dtype name the safetensors format defines (those outside DTYPE_SIZES are valid
# files that fusionlang refuses as unsupported) -> bits per element.
SAFETENSORS_DTYPE_BITS = {
    **{k: 8 * v for k, v in DTYPE_SIZES.items()},
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "U16": 16, "U32": 32, "U64": 64, "C64": 64,
}
# Tensor-name suffixes of quantized checkpoints: the stored values are not the weights.
QUANT_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".weight_scale_2")
# The files transformers' from_pretrained reads (in this order), and nothing else.
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


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
    """What compile time knows about a model: its directory, config and tensor headers.

    `config` is the parsed config.json ({} when the directory has none)."""

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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _regular_file(path: Path) -> int:
    """Size in bytes of `path`, which must be a regular file (links followed).

    Checked with stat() before any open(): opening a FIFO would block forever.
    Raises SourceError E011 for anything else, or when stat fails."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SourceError("E011", f"cannot read '{path}': {e.strerror}",
                          "check that the file exists (a dangling link?) and that you may read it") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
        raise SourceError("E011", f"'{path}' is {kind}, not a regular file",
                          "model files must be plain files: remove or replace it")
    return st.st_size


def _read_bytes(path: Path, header: bool = False) -> bytes:
    """The bytes of a regular file, or (`header`) a safetensors file's 8-byte length and
    the header it announces (cut at the file's end). SourceError E011 if unreadable."""
    _regular_file(path)
    try:
        with open(path, "rb") as f:
            if not header:
                return f.read()
            raw = f.read(8)
            return raw + f.read(min(struct.unpack("<Q", raw)[0], MAX_HEADER_BYTES)) if len(raw) == 8 else raw
    except OSError as e:
        raise SourceError("E011", f"cannot read '{path}': {e.strerror}",
                          "check the file's permissions (fusionlang needs to read it)") from None


def read_json_object(path: Path, what: str) -> dict:
    """Parse a JSON file that must hold an object (config.json, an index), as
    transformers does (UTF-8 text, `json.loads`).

    Raises SourceError E011 naming the file when it is not a regular file, unreadable,
    empty, not UTF-8, not JSON, or not a JSON object."""
    raw = _read_bytes(path)
    hint = f"fix or re-create {what} (re-download the model, or copy it from the model it was made from)"
    if not raw.strip():
        raise SourceError("E011", f"'{path}' is empty", hint)
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SourceError("E011", f"'{path}' is not UTF-8 text (byte {e.start})", hint) from None
    except json.JSONDecodeError as e:
        raise SourceError("E011", f"'{path}' is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          hint) from None
    except RecursionError:
        raise SourceError("E011", f"'{path}' is not valid JSON: nested too deeply", hint) from None
    if not isinstance(value, dict):
        raise SourceError("E011", f"'{path}' holds a JSON {_json_kind(value)}, not an object", hint)
    return value


def _json_kind(v) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(v), "null")


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _explain_invalid(raw: bytes, header_len: int, size: int) -> tuple[str | None, str]:
    """Why the safetensors library refused a file: (tensor name or None, reason).

    Only for the message: the verdict is the library's. Follows its rules: a JSON object
    of name -> {dtype, shape, data_offsets} (+ an optional `__metadata__` str->str map);
    offsets are non-negative integers whose span is shape × dtype size; sorted by start,
    the spans begin at 0, touch with no gap or overlap, and end at the file's end."""
    if header_len + 8 > size:
        return None, f"its header length ({header_len} bytes) goes beyond the end of the file (truncated?)"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, "its header is not JSON"
    if not isinstance(header, dict):
        return None, f"its header is a JSON {_json_kind(header)}, not an object"
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return None, "its __metadata__ is not a map of strings to strings"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return name, "its entry is not an object"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            return name, f"unknown dtype {json.dumps(dtype)}"
        if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
            return name, f"shape {json.dumps(shape)} is not a list of non-negative integers"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            return name, f"data_offsets {json.dumps(offsets)} are not two non-negative integers"
        start, end = offsets
        if end < start:
            return name, f"data_offsets {offsets} end before they start"
        bits = SAFETENSORS_DTYPE_BITS[dtype]
        for d in shape:
            bits *= d
        if -(-bits // 8) != end - start:
            return name, f"{dtype} {shape} needs {-(-bits // 8)} bytes but its data_offsets {offsets} span {end - start}"
        spans.append((start, end, name))
    at, prev = 0, None
    for start, end, name in sorted(spans):
        if start < at:
            return name, f"its data_offsets [{start}, {end}] overlap those of tensor '{prev}'"
        if start > at:
            return name, f"its data_offsets [{start}, {end}] leave a gap of {start - at} bytes before it"
        at, prev = end, name
    if at != size - 8 - header_len:
        who = f"its last tensor '{prev}' ends" if prev else "its tensors end"
        return prev, f"{who} at data byte {at} but the file has {size - 8 - header_len} data bytes (truncated or extra bytes)"
    return None, ""


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo (dtype name, shape, file) from one safetensors file's header.

    The verdict on validity is the `safetensors` library's own (`safe_open`, which checks
    the whole header without reading tensor data): a file it refuses is refused here,
    with the offending tensor named where one can be. Also refused: a path that is not a
    regular file (checked by stat first: a FIFO would block an open()), and dtypes the
    executor cannot compute with (e.g. U16, F8_E8M0, F4).

    Raises SourceError E011 naming the file (and the tensor)."""
    from safetensors import SafetensorError, safe_open

    size = _regular_file(path)
    raw = _read_bytes(path, header=True)
    header_len = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
    body = raw[8:8 + header_len]
    hint = "the file is corrupt or truncated: re-create or re-download it"
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as e:
        name, why = _explain_invalid(body, header_len, size) if len(raw) >= 8 else (None, "it is shorter than 8 bytes")
        where = f"tensor '{name}': " if name else ""
        raise SourceError("E011", f"'{path}' is not a valid safetensors file: {where}{why or 'refused'} "
                          f"(safetensors: {e})", hint) from None
    except OSError as e:
        raise SourceError("E011", f"cannot read '{path}': {e.strerror or e}",
                          "check the file's permissions (fusionlang needs to read it)") from None
    try:
        header = json.loads(body)  # valid: the library accepted it
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SourceError("E011", f"'{path}': its header cannot be read as JSON ({e})", hint) from None
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPE_SIZES:
            raise SourceError("E011", f"'{path}': tensor '{name}' has dtype {info['dtype']}, which fusionlang does not support",
                              f"supported dtypes: {', '.join(DTYPE_SIZES)}; convert the model first "
                              "(e.g. load it with transformers and save_pretrained in bf16)")
        out[name] = TensorInfo(info["dtype"], tuple(info["shape"]), str(path))
    return out


def _refuse_quantized(d: Path, config: dict, tensors: dict[str, TensorInfo]) -> None:
    """Quantized checkpoints (block-scaled fp8 with `*.weight_scale_inv`, other scale
    tensors, or a config `quantization_config`) store values that are not the weights:
    merging them as weights would be silently wrong. Raises SourceError E011."""
    scale = next((n for n in tensors if n.endswith(QUANT_SCALE_SUFFIXES)), None)
    qc = config.get("quantization_config")
    if scale is None and qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    what = f"tensor '{scale}'" if scale else f"config.json's quantization_config (quant_method {json.dumps(method)})"
    kind = "block-scaled fp8" if (scale or "").endswith("_scale_inv") or method == "fp8" else "quantized"
    raise SourceError("E011", f"'{d}' is a {kind} checkpoint ({what}); merging quantized weights is not supported yet",
                      "dequantize it first (load it with transformers and save_pretrained in bf16), "
                      "or merge the unquantized release of the model")


def _index_files(d: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files of a sharded checkpoint and its weight_map (tensor -> file name).

    Raises SourceError E011 naming the index when weight_map is missing or malformed:
    not an object, a value that is not a string, or a path outside the directory."""
    data = read_json_object(index, "the index")
    wm = data.get("weight_map")
    hint = ("the index needs a \"weight_map\" object of tensor name -> shard file name in this directory; "
            "re-create or re-download it")
    if not isinstance(wm, dict) or not wm:
        got = "missing" if wm is None else ("empty" if wm == {} else f"a JSON {_json_kind(wm)}")
        raise SourceError("E011", f"'{index}': its weight_map is {got}, not an object of tensor -> shard", hint)
    for name, f in wm.items():
        if not isinstance(f, str) or not f:
            raise SourceError("E011", f"'{index}': tensor '{name}' maps to {json.dumps(f)}, not a shard file name", hint)
        # NOTE: transformers' own rule (names, not resolved paths: HF cache shards are links)
        if Path(f).anchor or ".." in Path(f).parts or os.path.normpath(f) == ".":
            raise SourceError("E011", f"'{index}': tensor '{name}' maps to '{f}', outside the model directory", hint)
    return sorted({d / os.path.normpath(f) for f in wm.values()}), wm


def read_model_dir(path: str | os.PathLike) -> ModelHeader:
    """Header of a model directory, read as transformers' `from_pretrained` reads it.

    config.json (optional here) + `model.safetensors` when it exists (a stale
    `model.safetensors.index.json` next to it is ignored), else the shards listed in
    `model.safetensors.index.json`. Other `*.safetensors` files (adapters, leftovers) are
    never read. Raises SourceError: E010 when the directory is missing or has no such
    weights; E011 when a file is unreadable or corrupt, a listed shard is missing or
    lacks a listed tensor, or the checkpoint is quantized."""
    try:
        return _read_model_dir(Path(path))
    except OSError as e:  # e.g. a directory that cannot be listed
        raise SourceError("E011", f"cannot read model directory '{path}': {e.strerror or e}",
                          "check the directory's permissions (fusionlang needs to list and read it)") from None


def _read_model_dir(d: Path) -> ModelHeader:
    if not d.exists():
        raise SourceError("E010", f"model directory '{d}' does not exist",
                          "check the path (relative paths are relative to the spec file)")
    if not d.is_dir():
        raise SourceError("E010", f"'{d}' is not a directory", "local() takes a model directory")
    config: dict = {}
    cfg = d / "config.json"
    if os.path.lexists(cfg):
        config = read_json_object(cfg, "config.json")
    single, index = d / SAFE_WEIGHTS_NAME, d / SAFE_WEIGHTS_INDEX_NAME
    weight_map: dict[str, str] = {}
    if os.path.lexists(single):
        files = [single]
    elif os.path.lexists(index):
        files, weight_map = _index_files(d, index)
    else:
        stray = sorted(p.name for p in d.glob("*.safetensors"))
        if stray:
            raise SourceError("E011", f"'{d}' has no model weights that transformers loads: neither "
                              f"{SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}, only {', '.join(stray)}",
                              f"fusionlang reads what from_pretrained reads and never merges other files "
                              f"(adapters, leftovers); if one is the model's weights, rename it {SAFE_WEIGHTS_NAME}")
        has_bin = any(d.glob("*.bin")) or any(d.glob("*.pt"))
        # NOTE: E011, not E010: the directory is there but unusable, which `check` must
        # report rather than list as a model not present yet
        raise SourceError(
            "E011", f"no safetensors weights in '{d}'",
            "convert pickle checkpoints to safetensors first (pickle is not loaded for safety)"
            if has_bin else f"a model directory needs config.json and {SAFE_WEIGHTS_NAME} "
                            f"(or shards + {SAFE_WEIGHTS_INDEX_NAME})",
        )
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        if not os.path.lexists(f):
            raise SourceError("E011", f"shard '{os.path.relpath(f, d)}' listed in the index is missing from '{d}'",
                              "the model directory is incomplete; copy or re-download the missing shard")
        tensors.update(read_safetensors_header(f))
    for name, f in weight_map.items():
        info = tensors.get(name)
        if info is None or Path(info.file) != d / os.path.normpath(f):
            raise SourceError("E011", f"'{index}' lists tensor '{name}' in '{f}', which does not hold it",
                              "the index does not match its shards; re-create or re-download the model")
    _refuse_quantized(d, config, tensors)
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


def hf_download_command(repo: str, revision: str | None = None) -> str:
    """The download command of the installed huggingface_hub: `hf download` (>= 0.34),
    else `huggingface-cli download` (also when huggingface_hub is absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in re.findall(r"\d+", version("huggingface_hub"))[:2])
    except (PackageNotFoundError, ValueError):
        major, minor = 0, 0
    cmd = "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
    return f"{cmd} {repo}" + (f" --revision {revision}" if revision else "")


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
            f"fusionlang never downloads: fetch it once with `{hf_download_command(repo, revision)}` "
            "on a connected machine, or use local(\"dir\")",
        )
    rev = revision or "main"
    if ".." in Path(rev).parts or Path(rev).anchor or any(c in rev for c in "*?[]\\\0"):
        raise SourceError("E006", f"'{rev}' is not a revision name",
                          "a revision is a branch, tag or commit hash, e.g. revision=\"main\" or \"3f2a1c0\"")
    ref = repo_dir / "refs" / rev
    try:
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else rev
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError("E017", f"cannot read '{ref}' in the local Hugging Face cache: {e}",
                          f"the cache entry is damaged; re-fetch it with `{hf_download_command(repo, revision)}`") from None
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        cands = sorted(p.name for p in (repo_dir / "snapshots").glob(f"{commit}*")) if (repo_dir / "snapshots").is_dir() else []
        if len(cands) == 1:
            snap = repo_dir / "snapshots" / cands[0]
        else:
            have = sorted(p.name[:10] for p in (repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
            raise SourceError("E017", f"revision '{rev}' of '{repo}' is not in the local cache ({repo_dir})",
                              f"cached snapshots: {', '.join(have) or 'none'}; fetch this one with "
                              f"`{hf_download_command(repo, rev)}` on a connected machine")
    return snap


SOURCE_BUILTINS = ("local", "hf", "zoo", "package")


def is_source_call(e) -> bool:
    """Is this IR expression a model source: local(), hf(), zoo() or package()?"""
    return getattr(e, "kind", None) == "builtin" and getattr(e, "target", None) in SOURCE_BUILTINS


def zoo_model_dir(zoo: str, model: str) -> str:
    from ..zoo.paths import zoo_dir

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
        from ..lang.values import spec_path

        return spec_path(spec_file, args["path"])
    if target == "zoo":
        return zoo_model_dir(args["zoo"], args.get("model", "base"))
    if target == "package":
        return package_model_dir(args["package"], args.get("path") or "")
    return str(resolve_hf(args["repo"], args.get("revision")))


def _data_offsets(path: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """(first data byte, name -> [start, end) data offsets) of a safetensors file whose
    header `read_safetensors_header` already validated."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def same_tensor_bytes(pairs: list[tuple[TensorInfo, str, TensorInfo, str]], chunk: int = 1 << 26) -> bool:
    """Whether every pair (info_a, name_a, info_b, name_b) of stored tensors holds the same
    dtype, shape and bytes. Samples 4 KiB at the start, middle and end of every pair
    first (a few reads per tensor: different models differ there), and reads the pairs
    whole, `chunk` bytes at a time, only when every sample agrees. Raises OSError when a
    file cannot be read."""
    if any(a.dtype != b.dtype or a.shape != b.shape for a, _, b, _ in pairs):
        return False
    offsets: dict[str, tuple[int, dict]] = {}

    def where(info: TensorInfo, name: str) -> tuple[int, int]:
        if info.file not in offsets:
            offsets[info.file] = _data_offsets(info.file)
        base, table = offsets[info.file]
        s, e = table[name]
        return base + s, base + e

    spans = [(a.file, *where(a, na), b.file, *where(b, nb)) for a, na, b, nb in pairs]
    handles: dict[str, object] = {}
    try:
        def read(path: str, at: int, size: int) -> bytes:
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))  # noqa: SIM115
            f.seek(at)
            return f.read(size)

        probe = 4096
        for fa, sa, ea, fb, sb, _ in spans:
            size = ea - sa
            for at in {0, max(0, size // 2 - probe // 2), max(0, size - probe)}:
                if read(fa, sa + at, min(probe, size)) != read(fb, sb + at, min(probe, size)):
                    return False
        for fa, sa, ea, fb, sb, _ in spans:
            for at in range(0, ea - sa, chunk):
                size = min(chunk, ea - sa - at)
                if read(fa, sa + at, size) != read(fb, sb + at, size):
                    return False
        return True
    finally:
        for f in handles.values():
            f.close()


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict, dict[str, TensorInfo]]:
    """A PEFT LoRA adapter directory: (adapter_config.json, the tensor headers of
    adapter_model.safetensors). Raises SourceError: E010 (no such directory, no adapter
    files), E011 (unreadable or invalid files), E014 (an adapter fusionlang cannot apply:
    not LoRA, DoRA)."""
    d = Path(path)
    if not d.is_dir():
        raise SourceError("E010", f"adapter directory '{d}' does not exist", "check the path (relative to the spec file)")
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        missing = ", ".join(p.name for p in (cfg_path, weights) if not p.is_file())
        extra = " (adapter_model.bin: convert it to safetensors first)" if (d / "adapter_model.bin").is_file() else ""
        raise SourceError("E010", f"'{d}' is not a PEFT adapter directory: no {missing}{extra}",
                          "a directory written by PEFT's save_pretrained (or extract_lora)")
    config = read_json_object(cfg_path, "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise SourceError("E014", f"'{d}' is a {config.get('peft_type')} adapter; lora() applies LoRA adapters",
                          "merge it into its base with PEFT first (merge_and_unload) and read that model")
    if config.get("use_dora"):
        raise SourceError("E014", f"'{d}' is a DoRA adapter (use_dora): its magnitude vectors are not supported",
                          "merge it into its base with PEFT first (merge_and_unload) and read that model")
    return config, read_safetensors_header(weights)
