"""The lm-evaluation-harness bridge: a task of the user's own lm-eval YAML, scored on
merged, MoE and upscaled causal language models in memory.

    task arith = lm_eval("tasks/arith.yaml", metric="acc", limit=200, num_fewshot=0)

`read(path)` reads the YAML at compile time (its `task` name, `output_type`,
`metric_list`; lm-eval's `!function` tags are allowed and left to lm-eval). `score`
loads the model as `AutoModelForCausalLM` (a SMILE / WEMoE model with its upscaled
layers), wraps it in lm-eval's `HFLM(pretrained=model, tokenizer=...)` and runs
`simple_evaluate` with a `TaskManager` over the YAML's directory only (no built-in task
is indexed, nothing is downloaded), in that directory (so relative `data_files` resolve
next to the YAML). lm-eval 0.4.x; `pip install 'fusionlang[lm-eval]'`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from ..stages.data import DataError


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe YAML that reads lm-eval's custom tags (`!function utils.f`) as strings."""

    Loader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}"
                                 if isinstance(node, yaml.ScalarNode) else None)
    return Loader


def read(path: str) -> dict:
    """The task's description from its YAML: {"path", "dir", "name", "output_type",
    "metrics"}. Raises DataError: E010 (no such file), E011 (not a YAML task with a
    `task` name, or a group / include-only file)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DataError("E010", f"lm-eval task file '{path}' does not exist", "give the path of your task's .yaml "
                        "(relative to the spec)", "task")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_loader())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError("E011", f"cannot read lm-eval task file '{path}': {e}", "fix the YAML", "task") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
        raise DataError("E011", f"'{path}' is not an lm-eval task: it has no `task:` name",
                        "one task per YAML: task: NAME, dataset_path, output_type, doc_to_text, ... (lm-eval's task "
                        "guide)", "task")
    metrics = [m.get("metric") for m in doc.get("metric_list") or [] if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    return {"path": str(p.resolve()), "dir": str(p.resolve().parent), "name": doc["task"],
            "output_type": str(doc.get("output_type") or ""), "metrics": metrics}


def available() -> bool:
    """Whether lm-eval (with its Hugging Face model class) can be imported."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


@contextlib.contextmanager
def _quiet():
    """Send what lm-eval and its subprocesses write to stderr / stdout (tqdm bars, a
    `git describe` in a directory that is no repository) to a temporary file, at the
    descriptor level; yields a function returning what was written (for errors)."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)

            def text() -> str:
                sink.seek(0)
                return sink.read().decode("utf-8", "replace")

            yield text
        finally:
            for fd, s in zip((1, 2), saved):
                os.dup2(s, fd)
                os.close(s)


def score(model_dir: str, task: dict, device: str, on_batch=None) -> dict:
    """Score a causal LM directory on an lm-eval task. Returns {"score": value of the
    task's metric, "metric", "higher_is_better", "n" (documents), "results" (every
    metric lm-eval reported), "latency_per_batch_s" (the whole evaluation's wall time
    per batch of `batch_size` documents), "peak_mem_bytes"}. Raises DataError (E014)
    when lm-eval cannot run the task on the model, with the end of lm-eval's output."""
    from ..zoo.evaluate import _peak_mem_bytes
    from .sources import load_causal_lm

    model, tok = load_causal_lm(model_dir, device)
    old = os.getcwd()
    t0 = time.perf_counter()
    with _quiet() as output:
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager

            os.chdir(task["dir"])
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=int(task["batch_size"]), device=device)
            manager = TaskManager(include_path=task["dir"], include_defaults=False)
            out = simple_evaluate(model=lm, tasks=[task["name"]], task_manager=manager,
                                  num_fewshot=task.get("num_fewshot"), limit=task.get("limit"), bootstrap_iters=0,
                                  log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
            error = None
        except Exception as e:  # noqa: BLE001  (lm-eval raises anything; the user gets its message)
            out, error = None, f"{type(e).__name__}: {e}"
        finally:
            os.chdir(old)
        log = output()
    if error is not None or not out or task["name"] not in out.get("results", {}):
        tail = "\n".join(log.strip().splitlines()[-6:])
        raise DataError("E014", f"lm-eval could not run task '{task['name']}' on '{os.path.basename(model_dir)}': "
                        f"{error or 'no results'}" + (f"\n{tail}" if tail else ""),
                        "check the task YAML with lm-eval itself (lm_eval --tasks NAME --include_path DIR)")
    res = out["results"][task["name"]]
    values = {k.split(",")[0]: v for k, v in res.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    metric = task.get("metric") or (task["metrics"][0] if task["metrics"] else next(iter(values), None))
    if metric not in values:
        raise DataError("E006", f"lm-eval reported no '{metric}' for task '{task['name']}' (it reported: "
                        f"{', '.join(values) or 'nothing'})", f"metric= one of {', '.join(values)}")
    n = int(res.get("sample_len") or out.get("n-samples", {}).get(task["name"], {}).get("effective") or 0)
    wall = time.perf_counter() - t0
    batches = max(1, -(-n // int(task["batch_size"])))
    if on_batch:
        on_batch(batches, batches)
    higher = out.get("higher_is_better", {}).get(task["name"], {}).get(metric, True)
    return {"score": float(values[metric]), "metric": metric, "higher_is_better": bool(higher), "n": n,
            "results": values, "latency_per_batch_s": wall / batches, "peak_mem_bytes": _peak_mem_bytes(device),
            "batch_size": int(task["batch_size"])}
