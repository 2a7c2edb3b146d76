"""Running the model stages of a plan, with their results cached on disk.

A stage's result is a safetensors file named by a content hash of everything it depends
on: the stage kind and parameters, the model's files (config.json and every
*.safetensors, byte for byte: each file's XXH3-128 digest is remembered by file identity, see
`model_hash`) and the data's fingerprint (a hash of the selected rows).
It lives in `$FUSIONLANG_CACHE/stages/` (default `~/.cache/fusionlang/stages/`) and is
reused by later runs and by every `tune()` candidate of a run. A stage holds one model in
memory at a time. Writes are atomic (a temporary file renamed into place), so an
interrupted stage leaves no partial result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..plan.graph import Plan, SourceSpec
from . import data as D
from .data import DataError

FORMAT = 2  # bump when a statistic's definition changes: old cache entries are then ignored


def cache_root() -> Path:
    from ..zoo.paths import cache_dir

    return cache_dir() / "stages"


_MODEL_HASHES: dict[tuple, str] = {}


def model_hash(model_dir: str) -> str:
    """sha256 over the model's config.json and *.safetensors files (each file's name and
    the XXH3-128 digest of its bytes: a content hash at memory speed, ~10x sha256's, for
    a cache key rather than a signature). A file's digest is remembered in the cache
    directory under its identity (path, size, modification and change times in ns,
    inode): a later run reads an unchanged multi-GB model again only if that memo is
    gone. Any write to a file changes its change time (which a user cannot set), so the
    memo cannot go stale."""
    d = Path(model_dir)
    files = sorted([d / "config.json", *d.glob("*.safetensors")])
    idents = [f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
              for f in files for st in [f.stat()]]
    key = tuple(idents)
    if key not in _MODEL_HASHES:
        memo = _digest_memo()
        h = hashlib.sha256()
        for f, ident in zip(files, idents):
            if ident not in memo:
                memo[ident] = _file_digest(f)
                _remember_digest(ident, memo[ident])
            h.update(f.name.encode() + b"\0" + memo[ident].encode())
        _MODEL_HASHES[key] = h.hexdigest()
    return _MODEL_HASHES[key]


def _file_digest(path: Path) -> str:
    """XXH3-128 of a file's bytes, read through a read-only mapping (no copies)."""
    import mmap

    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return h.hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for at in range(0, len(mm), 1 << 26):
                    h.update(view[at:at + (1 << 26)])
            finally:
                view.release()
    return h.hexdigest()


def _memo_file() -> Path:
    return cache_root() / "file-digests-xxh3.json"


def _digest_memo() -> dict[str, str]:
    try:
        memo = json.loads(_memo_file().read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remember_digest(ident: str, digest: str) -> None:
    """Add one file's digest to the memo (read again first: another run may have added
    some; written to a temporary file and renamed, so a reader never sees half)."""
    path = _memo_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        memo = _digest_memo()
        memo[ident] = digest
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs reading the file again next time


def stage_key(stage: dict) -> str:
    """The content hash naming a stage's cached result: kind, parameters, every model's
    files (unless the stage says `reads_weights: false`, e.g. a seeded random router)
    and every data value's rows."""
    datas = stage["data"] if isinstance(stage["data"], list) else [stage["data"]]
    text = json.dumps({"format": FORMAT, "kind": stage["kind"], "params": stage["params"],
                       "model": model_hash(stage["model_dir"]) if stage.get("reads_weights", True) else "",
                       "models": [model_hash(d) for d in stage.get("model_dirs", [])],
                       "data": [D.load(d).fingerprint for d in datas]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compute(stage: dict, device, on_batch=None, log=None, names: list[str] | None = None) -> dict:
    """A stage's result tensors (file tensor name -> float32 CPU tensor); `names`: the
    tensors the plan reads (AdaMerging writes a coefficient vector for each)."""
    import torch

    from . import models as M
    from . import statistics as S

    torch.manual_seed(0)
    if stage["kind"] == "adamerging":
        from . import adamerging as A

        lam, covered = A.learn(stage, device, log)
        return A.result(stage, lam, covered, names or [])
    if stage["kind"] == "router":
        from . import routers as R

        return R.compute(stage, device, log)
    if stage["kind"] == "wemoe":
        from . import wemoe as W

        return W.train(stage, device, log)
    if stage["kind"] in ("align", "barycenter"):
        from . import align as AL

        return AL.compute(stage, device, log)
    if stage["kind"] == "gram_plusplus":
        from . import regmean_pp as R

        return R.grams(stage, device, log)  # one result per model (a joint stage)
    if stage["kind"] == "bitdelta":
        from . import bitdelta as B

        return B.train(stage, device, log)
    if stage["kind"] == "pruning_stats":
        from . import pruning as P

        return P.stats(stage, device, log)
    ex = D.load(stage["data"])
    sm = M.build(stage["model_dir"], stage["data"], device)
    p = stage["params"]
    if stage["kind"] == "gram":
        return S.gram(sm, ex, int(p["batch_size"]), on_batch, bool(p.get("include_padding", True)))
    return S.fisher(sm, ex, int(p["batch_size"]), bool(p["normalize"]), float(p["minimal"]), on_batch,
                    str(p.get("batch_order", "given")))


def _release() -> None:
    """Give the memory of a finished stage (its module, activations, results) back to the
    system before the next one: a collection, then glibc's `malloc_trim`, where it exists
    (freed heap memory otherwise stays in the process and adds up across stages)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _stage_file(root: Path, st: dict) -> tuple[str, Path, bool]:
    """(content key, cache file, joint) of a stage source; a joint stage is one
    computation for every model's source (`st["index"]`), one file each."""
    joint = "index" in st
    base_key = stage_key({k: v for k, v in st.items() if k not in ("index", "of")})
    return base_key, root / (f"{base_key}-{st['index']}.safetensors" if joint else f"{base_key}.safetensors"), joint


def _check_computed(st: dict, src: SourceSpec, result: dict) -> None:
    """Raise DataError (E014) when a stage's result lacks a tensor the plan reads."""
    missing = sorted(set(src.tensors) - set(result))
    if missing:
        raise DataError("E014", f"the {st['kind']} stage of '{st['model']}' computed no statistic for "
                        f"{len(missing)} tensor(s), e.g. '{missing[0]}': the forward pass never reached "
                        "that layer", "treat those tensors with a rule (e.g. \"*.pooler.*\" => base)")


def _run_remote(stages: dict, root: Path, remote, log) -> None:
    """Compute every stage not cached yet with `remote(jobs)` (all at once: e.g. Ray tasks)
    and cache the results, so that the sequential pass finds them all. `remote` takes
    [(stage, tensor names, label, spec place)] and yields (job, result) as each finishes;
    a job's DataError is raised as RunError at its place."""
    import contextlib

    jobs, owners = [], {}
    for i, (key, src) in enumerate(stages.items()):
        st = src.stage
        base_key, file, joint = _stage_file(root, st)
        if _cached(file, src) or base_key in owners:
            continue
        what = f"stage {i + 1}/{len(stages)}: {st['kind']}({st.get('of', st['model'])}, {st.get('data_text', '')})"
        owners[base_key] = (src, joint, what)
        jobs.append((st, list(src.tensors), base_key, src.at))
    if not jobs:
        return
    if log:
        log(f"running {len(jobs)} model stage{'s' * (len(jobs) != 1)} {getattr(remote, 'where', 'elsewhere')}")
    t0 = time.perf_counter()
    # NOTE: closed on any error, so that a stage process ends at once (its pipes close)
    with contextlib.closing(remote(jobs)) as results:
        _cache_results(results, owners, root, log, t0)


def _cache_results(results, owners: dict, root: Path, log, t0: float) -> None:
    """Save each (job, result) of `_run_remote`'s jobs in the stage cache."""
    from ..runtime.errors import RunError

    for (st, _names, base_key, _at), result in results:
        src, joint, what = owners[base_key]
        try:
            if joint:
                for j, res in enumerate(result):
                    _save(root / f"{base_key}-{j}.safetensors", res, st)
            else:
                _check_computed(st, src, result)
                _save(root / f"{base_key}.safetensors", result, st)
        except DataError as e:
            raise RunError(e.message, e.hint, e.code, src.at) from None
        if log:
            log(f"{what}: computed ({time.perf_counter() - t0:.1f}s)")
        del result


def run_stages(plan: Plan, device, log: Callable[[str], None] | None = None, remote=None) -> Plan:
    """A copy of `plan` whose stage sources point at their computed (or cached) results.
    `remote`: compute the stages not cached yet elsewhere first (`_run_remote`; the Ray
    executor's tasks), else here one by one. Raises RunError (E010/E011/E014/E006 at
    the stage's call) when a stage cannot run."""
    from ..runtime.errors import RunError

    stages = {k: s for k, s in plan.sources.items() if s.stage}
    if not stages:
        return plan
    root = cache_root()
    if remote is not None:
        _run_remote(stages, root, remote, log)
    out = plan.copy()
    out.sources = dict(plan.sources)
    for i, (key, src) in enumerate(stages.items()):
        st = src.stage
        what = f"stage {i + 1}/{len(stages)}: {st['kind']}({st.get('of', st['model'])}, {st.get('data_text', '')})"
        try:
            base_key, file, joint = _stage_file(root, st)
            if joint and not _cached(file, src):
                if log:
                    log(f"{what}: {st['estimate']['examples']} examples (all models at once)")
                results = compute(st, device, None, (lambda line, what=what: log(f"{what}: {line}")) if log else None)
                for j, res in enumerate(results):
                    _save(root / f"{base_key}-{j}.safetensors", res, st)
                del results, res
                _release()
            elif joint and log:
                log(f"{what}: cached ({file.name})")
            if not joint and not _cached(file, src):
                if log:
                    n_ex = st["estimate"]["examples"]
                    log(f"{what}: {n_ex} examples" if n_ex or st["kind"] not in ("align", "barycenter")
                        else f"{what}: from weights")
                t0 = time.perf_counter()
                last = [t0]

                def on_batch(done: int, total: int, what=what, t0=t0, last=last) -> None:
                    now = time.perf_counter()
                    if log and (done == total or now - last[0] >= _interval()):
                        last[0] = now
                        log(f"{what}: batch {done}/{total} ({now - t0:.1f}s)")

                result = compute(st, device, on_batch, (lambda line, what=what: log(f"{what}: {line}")) if log else None,
                                 list(src.tensors))
                _check_computed(st, src, result)
                _save(file, result, st)
                del result
                _release()
            elif not joint and log:
                log(f"{what}: cached ({file.name})")
            if st["kind"] == "adamerging" and log:
                log(f"{what}: {coefficient_summary(file, st)}")
            if st["kind"] == "router" and log:  # also when cached: the warning concerns the output
                from .routers import conditioning_of

                warning = conditioning_of(file, st)
                if warning:
                    log(warning)
        except DataError as e:
            raise RunError(e.message, e.hint, e.code, src.at) from None
        tensors = {t: (d, shape, str(file)) for t, (d, shape, _) in src.tensors.items()}
        out.sources[key] = replace(src, path=str(root), tensors=tensors)
    return out


def learned_by_output(plan: Plan) -> dict[str, list]:
    """Per output name, what the AdaMerging stages it reads learned: {"stage", "mode",
    "models", "coefficients"} with one λ per model (task mode) or, per model, its λ per
    tensor (layer mode). For report.json."""
    from safetensors.torch import load_file

    info: dict[str, dict] = {}
    for key, src in plan.sources.items():
        st = src.stage
        if not st or st["kind"] != "adamerging":
            continue
        files = {f for _, _, f in src.tensors.values()}
        values = {}
        for f in files:
            values.update(load_file(f))
        if st["params"]["mode"] == "task":
            coeffs = [float(v) for v in next(iter(values.values()))]
            per_model = dict(zip(st["models"], coeffs))
        else:
            per_model = {m: {t: float(v[i]) for t, v in sorted(values.items())} for i, m in enumerate(st["models"])}
        info[key] = {"stage": key, "mode": st["params"]["mode"], "models": st["models"], "coefficients": per_model}
    out: dict[str, list] = {}
    if not info:
        return out
    for o in plan.outputs.values():
        read = {plan.nodes[n].param("source") for n in plan.ancestors(o.tensors.values())
                if n in plan.nodes and plan.nodes[n].op == "load"}
        found = [info[k] for k in sorted(read) if k in info]
        if found:
            out[o.name] = found
    return out


def coefficient_summary(file: Path, stage: dict) -> str:
    """The learned AdaMerging coefficients as a line: per model λ (task mode) or the mean
    and range of its per-tensor λ (layer mode)."""
    from safetensors.torch import load_file

    values = load_file(str(file))
    if not values:
        return "no coefficients"
    import torch

    stack = torch.stack(list(values.values()))  # [tensors, n]
    parts = []
    for i, m in enumerate(stage["models"]):
        col = stack[:, i]
        if stage["params"]["mode"] == "task":
            parts.append(f"{m}: {float(col[0]):.4f}")
        else:
            parts.append(f"{m}: mean {float(col.mean()):.4f} [{float(col.min()):.4f}, {float(col.max()):.4f}]")
    return "learned coefficients " + "; ".join(parts)


def _interval() -> float:
    try:
        return float(os.environ.get("FUSIONLANG_PROGRESS_INTERVAL", "10"))
    except ValueError:
        return 10.0


def _cached(file: Path, src: SourceSpec) -> bool:
    """Whether `file` holds every tensor the plan reads from the stage, with its shape."""
    if not file.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open)
    except Exception:  # noqa: BLE001 (a damaged cache entry, whatever the error, is recomputed)
        return False
    return all(have.get(t) == tuple(shape) for t, (_, shape, _) in src.tensors.items())


def _save(file: Path, result: dict, stage: dict) -> None:
    from safetensors.torch import save_file

    from ..runtime.errors import RunError

    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        save_file(result, str(tmp), metadata={"fusionlang_stage": json.dumps(
            {"kind": stage["kind"], "params": stage["params"], "model": stage["model_dir"]})})
        os.replace(tmp, file)
    except OSError as e:
        raise RunError(f"cannot write the stage cache '{file}': {e}",
                       "free some disk space, or point $FUSIONLANG_CACHE at a writable directory", "E016") from None
