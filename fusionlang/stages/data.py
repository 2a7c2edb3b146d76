"""Data values: a zoo task's split, or the user's own files read with `datasets`.

A data value is described by a JSON-able dict (what the plan stores):

    {"kind": "zoo", "task": "tops", "zoo": "vision", "split": "train", "n": 256, "seed": 0}
    {"kind": "files", "path": "/abs/calib.jsonl", "format": "json", "split": "train",
     "text": "prompt", "image": None, "label": "label", "prompt": None, "answer": None,
     "n": 256, "seed": None}
    {"kind": "zoo", "task": "arith", "zoo": "llm", "split": "test", ...}   (an LLM zoo domain:
                                                                         text, prompt, answer)

`load(spec)` reads it into `Examples` (texts or images, labels when known, prompts and
answers for exact match, and a content fingerprint) and raises `DataError` for what a user can get
wrong (a missing file, an unknown column, empty or too small data), so `compile` reports
it before anything runs. Rows: the first `n`, or with `seed` the first `n` of a
permutation drawn from `torch.Generator().manual_seed(seed)` (deterministic everywhere).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(Exception):
    """A bad data value: `code` (E010 absent file, E011 unreadable, E006 bad value),
    `message`, `hint`, and `arg`, the builtin's argument it concerns (for the location)."""

    def __init__(self, code: str, message: str, hint: str = "", arg: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint, self.arg = code, message, hint, arg

    def __reduce__(self):  # pickled whole (raised in a Ray task)
        return type(self), (self.code, self.message, self.hint, self.arg), self.__dict__


@dataclass(frozen=True)
class Examples:
    """Rows of a data value. `texts` (tuple of str) or `images` (uint8 array [N, C, H, W]
    for zoo images; a list of PIL images for files); `labels` (tuple of int) or None;
    `fingerprint`: sha256 of the selected rows' content; `task`: the zoo task's
    `TaskSpec` (its head and preprocessing) for zoo data, else None; `prompts` and
    `answers` (tuples of str) the rows' prompts and reference answers, for exact match."""

    texts: tuple[str, ...] | None
    images: Any
    labels: tuple[int, ...] | None
    fingerprint: str
    task: Any = None
    prompts: tuple[str, ...] | None = None
    answers: tuple[str, ...] | None = None

    def __len__(self) -> int:
        for rows in (self.texts, self.prompts, self.images):
            if rows is not None:
                return len(rows)
        return 0


def describe(spec: dict) -> str:
    """How a data value is shown in plans and progress lines."""
    if spec["kind"] == "zoo":
        what = f"{spec['zoo']}/{spec['task']} {spec['split']}"
    else:
        what = os.path.basename(spec["path"])
    n = f", n={spec['n']}" if spec.get("n") is not None else ""
    seed = f", seed={spec['seed']}" if spec.get("seed") is not None else ""
    return what + n + seed


def from_args(builtin: str, args: dict, spec_file: str) -> dict:
    """The description of a `dataset(...)` / `zoo_data(...)` call's evaluated arguments;
    a relative path is relative to the spec file's directory."""
    n = args.get("n")
    seed = args.get("seed")
    common = {"split": str(args.get("split") or "train"), "n": int(n) if n is not None else None,
              "seed": int(seed) if seed is not None else None}
    if builtin == "zoo_data":
        return {"kind": "zoo", "task": str(args["task"]), "zoo": str(args.get("zoo") or "text"), **common}
    path = os.path.expanduser(str(args["path"]))
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(spec_file)), path)
    return {"kind": "files", "path": os.path.normpath(path), "format": str(args.get("format") or "auto"),
            "text": args.get("text"), "image": args.get("image"), "label": args.get("label"),
            "prompt": args.get("prompt"), "answer": args.get("answer"), **common}


def load(spec: dict) -> Examples:
    """The rows of a data value. Raises DataError."""
    return _load(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _load(key: str) -> Examples:
    spec = json.loads(key)
    cols = _zoo_rows(spec) if spec["kind"] == "zoo" else _file_rows(spec)
    texts, images, labels, prompts, answers = (cols.get(k) for k in ("texts", "images", "labels", "prompts", "answers"))
    total = next(len(rows) for rows in (texts, prompts, images) if rows is not None)
    if total == 0:
        raise DataError("E006", f"the data {describe(spec)!r} has no rows", "give a file with at least one row",
                        "path" if spec["kind"] == "files" else "task")
    idx = _select(total, spec.get("n"), spec.get("seed"), spec)
    if texts is not None:
        texts = tuple(texts[i] for i in idx)
    elif images is not None:
        images = images[list(idx)] if hasattr(images, "shape") else [images[i] for i in idx]
    if labels is not None:
        labels = tuple(int(labels[i]) for i in idx)
    if prompts is not None:
        prompts = tuple(prompts[i] for i in idx)
    if answers is not None:
        answers = tuple(answers[i] for i in idx)
    fingerprint = _fingerprint(texts, images, labels, prompts, answers)
    return Examples(texts, images, labels, fingerprint, cols.get("task"), prompts, answers)


def _select(total: int, n: int | None, seed: int | None, spec: dict) -> list[int]:
    if n is None:
        n = total
    if n < 1:
        raise DataError("E006", f"n={n} must be at least 1", "ask for e.g. n=256 rows", "n")
    if n > total:
        raise DataError("E006", f"n={n} rows asked of the data {describe({**spec, 'n': None, 'seed': None})!r}, "
                        f"which has {total}", f"ask for at most n={total}, or leave n out to use every row", "n")
    if seed is None:
        return list(range(n))
    import torch

    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:n].tolist()


def _fingerprint(texts, images, labels, prompts=None, answers=None) -> str:
    h = hashlib.sha256()
    if prompts is not None or answers is not None:
        # NOTE: only for data with prompts/answers, so the fingerprints (stage cache keys)
        # of text, image and label data stay what they were
        h.update(json.dumps([list(prompts or ()), list(answers or ())]).encode())
    if texts is not None:
        h.update(json.dumps(list(texts)).encode())
    elif images is None:
        pass
    elif hasattr(images, "tobytes"):
        h.update(repr((images.shape, str(images.dtype))).encode())
        h.update(images.tobytes())
    else:
        for im in images:
            h.update(repr((im.size, im.mode)).encode())
            h.update(im.tobytes())
    h.update(json.dumps(list(labels) if labels is not None else None).encode())
    return h.hexdigest()


def _zoo_rows(spec: dict) -> dict:
    from ..zoo.errors import ZooError
    from ..zoo.evaluate import find_task, load_task_data
    from ..zoo.paths import zoo_dir

    manifest = zoo_dir(spec["zoo"]) / "zoo.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("kind") == "llm":
        return _llm_zoo_rows(spec, json.loads(manifest.read_text()), manifest.parent)
    try:
        task = find_task(spec["task"], spec["zoo"])
        ds = load_task_data(task)
        split = ds.split(spec["split"])
    except ZooError as e:
        raise DataError("E018", e.message, e.hint or f"build the zoo: fusionlang zoo build {spec['zoo']}",
                        "task") from None
    except KeyError as e:
        raise DataError("E006", str(e).strip("'\""), "splits: train, val, test", "split") from None
    if task.kind == "text":
        return {"texts": tuple(split.texts), "labels": tuple(split.labels), "task": task}
    return {"images": split.images, "labels": tuple(split.labels), "task": task}


def _llm_zoo_rows(spec: dict, manifest: dict, root) -> dict:
    """An LLM zoo domain's rows (`fusionlang zoo build llm`): its JSON lines file of the
    split, with the text (for perplexity), prompt and answer (for exact match) of each."""
    tasks = manifest.get("tasks") or {}
    if spec["task"] not in tasks:
        import difflib

        close = difflib.get_close_matches(spec["task"], list(tasks), n=1)
        raise DataError("E006", f"the '{spec['zoo']}' zoo has no domain '{spec['task']}'",
                        f"did you mean \"{close[0]}\"?" if close else f"its domains: {', '.join(tasks)}", "task")
    files = tasks[spec["task"]]["data"]
    if spec["split"] not in files or spec["split"] in ("text", "prompt", "answer"):
        splits = [k for k in files if k not in ("text", "prompt", "answer")]
        raise DataError("E006", f"the '{spec['zoo']}' zoo's domain '{spec['task']}' has no split '{spec['split']}'",
                        f"splits: {', '.join(splits)} (test: the held-out rows)", "split")
    path = root / files[spec["split"]]
    if not path.is_file():
        raise DataError("E018", f"the zoo file '{path}' is missing", f"rebuild the zoo: fusionlang zoo build "
                        f"{spec['zoo']}", "task")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cols = {k: files.get(k, k) for k in ("text", "prompt", "answer")}
    return {"texts": tuple(r[cols["text"]] for r in rows),
            "prompts": tuple(r[cols["prompt"]] for r in rows) if all(cols["prompt"] in r for r in rows) else None,
            "answers": tuple(str(r[cols["answer"]]) for r in rows) if all(cols["answer"] in r for r in rows) else None}


def _column(ds, name: str, key: str) -> list[str]:
    values = list(ds[name])
    bad = next((i for i, t in enumerate(values) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError("E006", f"{key} column '{name}' holds {type(values[bad]).__name__} in row {bad}, "
                        "not text", f"every row needs a string in the {key} column", key)
    return values


def _file_rows(spec: dict) -> dict:
    path = spec["path"]
    if not os.path.exists(path):
        raise DataError("E010", f"data file '{path}' does not exist", "check the path (relative to the spec file)", "path")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError("E006", f"the data file '{path}' is empty", "give a file with at least one row", "path")
    ds = _read_files(spec)
    columns = list(ds.column_names)
    named = {k: spec.get(k) for k in ("text", "image", "label", "prompt", "answer") if spec.get(k) is not None}
    if not named.get("text") and not named.get("image") and not named.get("prompt"):
        raise DataError("E006", f"say which column holds the inputs: the data has columns {', '.join(columns)}",
                        f'e.g. dataset("{os.path.basename(path)}", text="{columns[0] if columns else "text"}")', "path")
    if named.get("text") and named.get("image"):
        raise DataError("E006", "give text= or image=, not both", "one input column per data value", "image")
    if named.get("image") and (named.get("prompt") or named.get("answer")):
        raise DataError("E006", "prompt= and answer= name text columns, for exact match; image data has none",
                        "give text= (and prompt=, answer=) for text data", "prompt" if named.get("prompt") else "answer")
    for k, col in named.items():
        if col not in columns:
            import difflib

            close = difflib.get_close_matches(col, columns, n=1)
            raise DataError("E006", f"the data has no column '{col}' (columns: {', '.join(columns)})",
                            f"did you mean {k}=\"{close[0]}\"?" if close else f"name one of: {', '.join(columns)}", k)
    out: dict = {}
    if named.get("label"):
        labels = list(ds[named["label"]])
        bad = next((v for v in labels if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise DataError("E006", f"label column '{named['label']}' holds {bad!r}: labels must be class indices "
                            "(whole numbers from 0)", "map class names to indices before saving the data", "label")
        out["labels"] = labels
    if named.get("prompt"):
        out["prompts"] = tuple(_column(ds, named["prompt"], "prompt"))
    if named.get("answer"):
        # NOTE: a numeric answer column (e.g. 163) is compared as its text
        out["answers"] = tuple(str(v) for v in ds[named["answer"]])
    if named.get("text"):
        out["texts"] = tuple(_column(ds, named["text"], "text"))
    elif named.get("image"):
        images = list(ds[named["image"]])
        if images and not hasattr(images[0], "convert"):
            raise DataError("E006", f"image column '{named['image']}' does not hold images", "store the images with "
                            "the datasets Image feature (e.g. a save_to_disk directory or parquet written by datasets)",
                            "image")
        out["images"] = [im.convert("RGB") for im in images]
    return out


def _read_files(spec: dict):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path, fmt = spec["path"], spec.get("format") or "auto"
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if spec["split"] not in ds:
                    raise DataError("E006", f"the saved data has no split '{spec['split']}' "
                                    f"(splits: {', '.join(ds)})", f'pass split="{next(iter(ds))}"', "split")
                ds = ds[spec["split"]]
            return ds
        if fmt == "auto":
            fmt = FORMATS.get(os.path.splitext(path)[1].lower())
            if fmt is None:
                raise DataError("E006", f"cannot tell the format of '{os.path.basename(path)}' from its extension",
                                'pass format="json", "csv" or "parquet"', "path")
        # NOTE: keep_in_memory: nothing is written to the datasets cache for a small user file
        return datasets.load_dataset(fmt, data_files=path, split="train", keep_in_memory=True)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds for a bad file)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError("E011", f"cannot read data file '{path}': {msg[:300]}",
                        "check that the file is valid JSON lines / CSV / parquet (or give format=)", "path") from None
