"""Merge candidates (a tune() grid point or a search trial): merged into a temporary
directory, scored on the tasks' split, and cached by content (`candidate_key`), here one
at a time (`LocalCandidates`) or as Ray tasks, several at once (`RayCandidates`,
`--executor ray`). Both give each candidate the same scores: a candidate is merged by
the local executor and scored by the same code wherever it runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import ir

FORMAT = 1  # bump when a score's definition changes: cached candidates are then ignored


# -- the candidate cache
def cache_root() -> Path:
    from ..zoo.paths import cache_dir

    return cache_dir() / "search"


def candidate_key(plan, tasks: dict[str, dict], split: str, device: str) -> str:
    """The content hash naming a candidate's scores: the lowered merge (every output
    tensor's node: node ids hash op, parameters and inputs recursively), the digests of
    the input files it reads (`stages.run.model_hash`; a model stage's own key), the
    tasks (a zoo task's head file and description; a user task's data fingerprint), the
    split and the device type."""
    from ..stages import data as D
    from ..stages.run import _file_digest, model_hash, stage_key

    [out] = plan.outputs.values()  # the plan of one candidate (`plan_one`)
    used = {n.param("source") for n in plan.nodes.values() if n.op == "load"} | {out.reference}
    sources = {k: stage_key(s.stage) if s.stage else model_hash(s.path)
               for k, s in plan.sources.items() if k in used}
    task_keys = {}
    for name, t in tasks.items():
        if "spec" in t:  # a zoo task
            task_keys[name] = {"head": _file_digest(t["spec"].head_path), "info": t["spec"].info,
                               "limit": t.get("limit")}
        else:
            datas = t.get("data")
            task_keys[name] = {k: v for k, v in t.items() if k not in ("data", "span")} | {
                "data": D.load(datas).fingerprint if datas is not None else None}
    text = json.dumps({"format": FORMAT, "tensors": sorted(out.tensors.items()), "blocks": out.blocks,
                       "dtypes": out.dtypes, "config": out.config_overrides, "description": out.description,
                       "sources": sources, "tasks": task_keys, "split": split, "device": device},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_scores(key: str) -> dict | None:
    """A candidate's cached scores ({task: {metric: value}}), or None."""
    try:
        return json.loads((cache_root() / f"{key}.json").read_text())["scores"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or damaged: evaluated again


def store_scores(key: str, scores: dict, values: dict) -> None:
    """Remember a candidate's scores (atomic; an unwritable cache only costs a re-evaluation)."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"scores": scores, "values": values}))
        os.replace(tmp, root / f"{key}.json")
    except OSError:
        pass


def candidate_scores(prog: ir.Program, q: str, out: str, tasks: dict[str, dict], split: str, run_device: str,
                     eval_device: str, shard_bytes: int, progress, memo: dict, values: dict) -> tuple[dict, bool]:
    """The scores of merge `q` of `prog` (a candidate: its tune()s substituted) on the
    tasks' `split`, {task: {"accuracy", "loss"}}, and whether they came from the cache
    (`memo`: this run's, then the disk's); else merged into `out` (removed afterwards),
    scored and remembered. `progress(text)` during the merge and the evaluation."""
    plan = plan_one(prog, q, out)
    key = candidate_key(plan, tasks, split, eval_device)
    scores = memo.get(key) or cached_scores(key)
    if scores is not None:
        memo[key] = scores
        return scores, True
    scores = evaluate(plan, q, tasks, split, run_device, eval_device, shard_bytes, progress)
    store_scores(key, scores, values)
    memo[key] = scores
    return scores, False


def plan_one(prog: ir.Program, q: str, out: str):
    """The optimized plan that writes merge `q` alone to `out`."""
    from ..passes import run_passes
    from ..plan.lower import Lowerer

    b = prog.bindings[q]
    save = ir.SaveIR(name=q, display=q.split("::")[-1], path=out, dtype=None, span=b.span, path_span=b.span)
    return run_passes(Lowerer(prog.model_copy(update={"saves": (save,), "evals": ()})).lower())


def evaluate(plan, q: str, tasks: dict[str, dict], split: str, run_device: str, eval_device: str,
              shard_bytes: int, progress) -> dict:
    """Merge one candidate and score it: {task: {"accuracy", "loss" (where the task has them)}}."""
    from ..runtime.scheduler import run_plan
    from .evaluation import score_task

    [out] = (o.path for o in plan.outputs.values())
    run_plan(plan, run_device, shard_bytes, lambda d, n: progress(f"merged {min(d, n)}/{n} tensors"))
    try:
        scores = {}
        for name, task in tasks.items():
            res = score_task(out, task, eval_device, split,
                             on_batch=lambda b, n, name=name: progress(f"{name} batch {b}/{n}"))
            scores[name] = {m: float(res[m]) for m in ("accuracy", "loss") if m in res}
        return scores
    finally:
        shutil.rmtree(out, ignore_errors=True)


@dataclass
class Candidate:
    """One candidate of merge `q`: `prog` with its tune()s substituted, `values` (the
    parameters as the report shows them), `progress(text)` for its long steps."""

    prog: ir.Program
    q: str
    values: dict
    progress: Callable[[str], None]


@dataclass
class Scoring:
    """How candidates are scored: the tasks (resolved), the split, the devices, the shard size."""

    tasks: dict[str, dict]
    split: str
    run_device: str
    eval_device: str
    shard_bytes: int


class LocalCandidates:
    """Candidates merged and scored in this process, one at a time."""

    parallel = 1  # candidates a search may propose before it learns their scores
    where = ""  # how the header lines of a tune or a search say where candidates run

    def __init__(self) -> None:
        self.memo: dict[str, dict] = {}

    def scores(self, cands: list[Candidate], how: Scoring) -> list[tuple[dict, bool]]:
        """Each candidate's scores {task: {"accuracy", "loss"}} and whether they were reused
        (this run's memo or the disk cache), in the order given."""
        tmp = tempfile.mkdtemp(prefix="fusionlang-tune-")
        try:
            return [candidate_scores(c.prog, c.q, str(Path(tmp) / f"{c.q.split('::')[-1]}-{i}"), how.tasks, how.split,
                                     how.run_device, how.eval_device, how.shard_bytes, c.progress, self.memo, c.values)
                    for i, c in enumerate(cands)]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        pass


class RayCandidates(LocalCandidates):
    """Candidates merged and scored as Ray tasks (one CPU each; `parallel` = the cluster's
    CPUs, or GPUs when scoring on them). The driver looks each candidate up in the caches
    first and runs the others; a worker merges into its own temporary directory (the
    inputs are read at the plan's paths: shared storage) and returns the scores."""

    def __init__(self, address: str | None, gpu: bool = False):
        from ..runtime import ray_cluster as RC

        super().__init__()
        self.cluster = RC.connect(address)
        self.gpu = gpu and self.cluster.gpus > 0
        self.parallel = max(1, self.cluster.gpus if self.gpu else self.cluster.cpus)
        self.where = f"; as Ray tasks, {self.parallel} at a time"
        import ray

        # the workers import torch, transformers and the evaluation code while this
        # process plans the first candidates (seconds per worker, once)
        warm = ray.remote(_warm_up).options(num_cpus=1, num_gpus=1 if self.gpu else 0)
        self._warming = [warm.remote() for _ in range(self.parallel)]

    def scores(self, cands: list[Candidate], how: Scoring) -> list[tuple[dict, bool]]:
        import ray

        from ..runtime import ray_cluster as RC

        out: list[tuple[dict, bool] | None] = [None] * len(cands)
        todo: dict[str, list[int]] = {}
        tmp = tempfile.mkdtemp(prefix="fusionlang-tune-")
        try:
            for i, c in enumerate(cands):
                key = candidate_key(plan_one(c.prog, c.q, str(Path(tmp) / "key")), how.tasks, how.split,
                                    how.eval_device)
                hit = self.memo.get(key) or cached_scores(key)
                if hit is not None:
                    self.memo[key] = hit
                    out[i] = (hit, True)
                else:
                    todo.setdefault(key, []).append(i)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        remote = ray.remote(_candidate_task)
        env = RC.driver_env()

        def submit(key: str):
            c = cands[todo[key][0]]
            return remote.options(num_cpus=1, num_gpus=1 if self.gpu else 0, max_retries=RC.MAX_RETRIES).remote(
                env, c.prog, c.q, how)

        for key, scores in RC.imap_unordered(submit, list(todo), self.parallel,
                                             lambda key: f"candidate {cands[todo[key][0]].values}"):
            first, *rest = todo[key]
            store_scores(key, scores, cands[first].values)
            self.memo[key] = scores
            out[first] = (scores, False)
            cands[first].progress("merged and scored on a Ray worker")
            for i in rest:  # the same candidate twice in one batch: scored once
                out[i] = (scores, True)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.cluster.close()


def _warm_up() -> None:
    """On a Ray worker: import what scoring a candidate needs."""
    import transformers  # noqa: F401

    from . import evaluation  # noqa: F401


def _candidate_task(env: dict, prog: ir.Program, q: str, how: Scoring) -> dict:
    """On a Ray worker: merge candidate `q` of `prog` into a temporary directory of the
    worker's and score it (`evaluate`); the directory is removed."""
    from ..runtime import ray_cluster as RC

    RC.use_env(env)
    tmp = tempfile.mkdtemp(prefix="fusionlang-candidate-")
    try:
        plan = plan_one(prog, q, str(Path(tmp) / q.split("::")[-1]))
        return evaluate(plan, q, how.tasks, how.split, how.run_device, how.eval_device, how.shard_bytes,
                        lambda _text: None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_candidates(executor: str = "local", address: str | None = None, gpu: bool = False) -> LocalCandidates:
    """The candidate runner for `executor` ("local" or "ray"). Raises RunError (E032)
    when Ray is missing or unreachable."""
    return RayCandidates(address, gpu) if executor == "ray" else LocalCandidates()
