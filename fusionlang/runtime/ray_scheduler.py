"""The Ray scheduler: a plan's units as Ray tasks (`fusionlang run --executor ray`).

The same runner (`runner.Runner`) computes every unit, on a Ray worker instead of this
process; this process (the driver) routes each result to the same output sink and
commits the outputs all or none, so the files are bit-identical to the local
scheduler's (every op is a function of its inputs; randomised ops are seeded per tensor
and row offset, never per schedule).

- **Inputs by reference**: a task gets the plan once (an object in Ray's store, cached
  by each worker) and unit indices; workers read the safetensors files themselves
  (shared storage: `ray_cluster`).
- **Batches**: consecutive small units of a phase go to one task (about `BATCH_BYTES` of
  tensors read), so a task's overhead (milliseconds) is paid per batch, not per tensor.
- **Resources**: each task asks for one CPU (or GPU, for `--device cuda`) and the memory
  the plan estimates for its largest unit plus its results (`Plan.peak_bytes`).
- **Back-pressure**: at most `2 × CPUs` tasks are in flight, so the driver holds at most
  that many batches' results while it writes.
- **Phases**: a unit that takes another unit's export (a statistic shared by the row
  blocks of a split tensor) gets it by reference from its exporter's task; reduce nodes
  (model-wide statistics) are computed on the driver between phases, as locally.
- **Failures**: a lost worker's task runs again (`ray_cluster.MAX_RETRIES`); a task's own
  error (non-finite value, unreadable file) ends the run exactly as it would locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..plan.cluster import TASK_BASE_MEMORY
from ..plan.graph import Plan
from . import ray_cluster as RC
from .errors import RunError
from .reader import pick_device, trim_heap
from .runner import Runner
from .scheduler import LocalScheduler
from .sinks import DEFAULT_SHARD_BYTES, OutputSink
from .units import Phase, Unit, plan_phases, unit_memory

BATCH_BYTES = 32 << 20  # tensor bytes read per task, about; a unit above it is a task of its own
BATCH_UNITS = 256


def unit_read_bytes(plan: Plan, unit: Unit) -> int:
    """Bytes a unit reads from the input files."""
    return sum(plan.load_bytes(n) for n in unit.nodes if plan.nodes[n].op == "load")


def batches(plan: Plan, units: list[Unit], workers: int) -> list[list[int]]:
    """Indices of `units` in consecutive batches of about BATCH_BYTES read (fewer when the
    phase is small, so that every worker gets several batches)."""
    sizes = [unit_read_bytes(plan, u) for u in units]
    target = max(1, min(BATCH_BYTES, sum(sizes) // max(1, 4 * workers)))
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, n in enumerate(sizes):
        cur.append(i)
        size += n
        if size >= target or len(cur) >= BATCH_UNITS:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


# -- the worker side: one plan (and its mapped files) cached per worker process
_WORKER: dict = {}


def _context(plan_box: list, device: str) -> tuple[Plan, list[Phase], Runner]:
    import ray

    from .reader import TensorReader, keep_freed_memory

    key = (plan_box[0].hex(), device)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        keep_freed_memory()
        plan = ray.get(plan_box[0])
        dev = pick_device(device)
        _WORKER.update(key=key, plan=plan, phases=plan_phases(plan), runner=Runner(plan, dev, TensorReader(plan, dev)))
    return _WORKER["plan"], _WORKER["phases"], _WORKER["runner"]


def run_batch(plan_box: list, env: dict, device: str, phase: int, indices: list[int], reduce_values: dict | None,
              *export_dicts: dict) -> tuple[dict, tuple[list, int]]:
    """Compute units `indices` of phase `phase` on this worker. Returns (exports: node id
    -> value, for later units of the phase; (results, bytes read)), results being
    [(unit index, node id, value)] for every target that is written or reduced. An
    exception carries the failed unit's group as `fusionlang_group`. `env`: the driver's
    forwarded variables (`ray_cluster.driver_env`)."""
    RC.use_env(env)
    _maybe_crash_for_test()
    _, phases, runner = _context(plan_box, device)
    # NOTE: values cross processes on the host: moved to this worker's device here, and
    # results back to the host (a CPU-only driver cannot unpickle a CUDA tensor)
    dev = runner.device
    reduce_values = {k: v.to(dev) for k, v in (reduce_values or {}).items()}
    shared: dict = {}
    for d in export_dicts:
        shared.update({k: v.to(dev) for k, v in d.items()})
    exports: dict = {}
    results: list = []
    read0 = runner.reader.bytes_read
    for i in indices:
        unit = phases[phase].units[i]
        try:
            for nid, value, _owned in runner.run(unit, shared, reduce_values):
                if nid in unit.exports:
                    shared[nid] = value
                    exports[nid] = value.cpu()
                if nid in unit.writes or nid not in unit.exports:  # a FileSpans copy: by reference
                    results.append((i, nid, value.cpu() if isinstance(value, torch.Tensor) else value))
        except BaseException as e:
            e.fusionlang_group = unit.group
            raise
        if unit.trim_heap:
            trim_heap()
    return exports, (results, runner.reader.bytes_read - read0)


def _maybe_crash_for_test() -> None:
    """Fault injection for the retry test: when $FUSIONLANG_RAY_CRASH_ONCE names an
    existing file, remove it and kill this worker process (Ray then retries the task)."""
    marker = os.environ.get("FUSIONLANG_RAY_CRASH_ONCE")
    if marker:
        try:
            os.remove(marker)
        except FileNotFoundError:
            return
        os._exit(1)


class RayScheduler(LocalScheduler):
    """Runs a plan's units as Ray tasks on `cluster` (`ray_cluster.connect`); the driver
    computes the reduce nodes and writes the outputs (`LocalScheduler` does the rest:
    the sink, the commit, the located errors)."""

    def __init__(self, plan: Plan, cluster: RC.Cluster, device: str = "auto",
                 shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Callable[[int, int], None] | None = None):
        super().__init__(plan, "cpu", shard_bytes, progress)  # the driver only writes and reduces
        self.cluster = cluster
        self.worker_device = device
        self._remote = None
        self._plan_ref = None
        self._env: dict[str, str] = {}  # the driver's forwarded variables (ray_cluster.driver_env)
        self._read = 0  # bytes the tasks read

    def _run(self):
        import ray

        self._remote = ray.remote(run_batch)
        self._plan_ref = ray.put(self.plan)
        self._env = RC.driver_env()
        try:
            stats = super()._run()
        finally:
            self._plan_ref = None
        stats.bytes_read = self._read
        return stats

    def _run_phase(self, phase: Phase, reduce_values: dict, sink: OutputSink) -> dict[str, torch.Tensor]:
        import ray

        plan = self.plan
        workers = max(1, self.cluster.gpus if self._gpu else self.cluster.cpus)
        groups = batches(plan, phase.units, workers)
        largest = self.cluster.node_memory
        needed_reduces = {i for u in phase.units for i in u.outside if i in reduce_values}
        reduce_ref = ray.put({k: reduce_values[k] for k in needed_reduces}) if needed_reduces else None
        export_refs: dict[str, object] = {}  # node id -> the exports object of the task that computes it
        stat_inputs: dict[str, torch.Tensor] = {}

        def submit(b: int):
            units = [phase.units[i] for i in groups[b]]
            deps = list(dict.fromkeys(export_refs[i] for u in units for i in u.outside if i in export_refs))
            memory = max(unit_memory(plan, u) for u in units) + TASK_BASE_MEMORY
            if largest and memory > largest:
                self._unit = units[0]
                raise RunError(f"a tensor group ('{units[0].group}') needs about {memory / 2**30:.1f} GiB on a worker; "
                               f"the largest Ray node offers {largest / 2**30:.1f} GiB", "add memory to the workers, or "
                               "run with --executor local", RC.E_EXECUTOR)
            opts = {"num_returns": 2, "max_retries": RC.MAX_RETRIES, "memory": memory,
                    "num_cpus": 1, "num_gpus": 1 if self._gpu else 0}
            exports_ref, results_ref = self._remote.options(**opts).remote(
                [self._plan_ref], self._env, self.worker_device, phase.index, groups[b], reduce_ref, *deps)
            for u in units:
                for t in u.exports:
                    export_refs[t] = exports_ref
            return results_ref

        try:
            for b, (results, read) in RC.imap_unordered(submit, range(len(groups)), 2 * workers,
                                                        lambda b: f"tensor group '{phase.units[groups[b][0]].group}'"):
                self._read += read
                for i, nid, value in results:
                    unit = phase.units[i]
                    self._unit = unit
                    self._deliver(unit, nid, value, True, stat_inputs, sink)
        except BaseException as e:  # located by LocalScheduler._run, at the unit that failed
            group = getattr(e, "fusionlang_group", None)
            self._unit = next((u for u in phase.units if u.group == group), self._unit)
            raise
        return stat_inputs

    @property
    def _gpu(self) -> bool:
        return self.worker_device == "cuda" or (self.worker_device == "auto" and self.cluster.gpus > 0)


def run_plan_on_ray(plan: Plan, address: str | None = None, device: str = "auto",
                    shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Callable[[int, int], None] | None = None,
                    log: Callable[[str], None] | None = None):
    """`scheduler.run_plan` with Ray tasks: model stages first (one task each, results
    cached on the driver), then the units. Same outputs, same errors, same commit.
    Raises RunError E032 when Ray is missing, unreachable, or loses a task for good."""
    cluster = RC.connect(address)
    try:
        staged = any(s.stage for s in plan.sources.values())
        if staged:
            from ..stages.run import run_stages

            # NOTE: the driver only saves what the stage tasks computed: its own device is the CPU
            plan = run_stages(plan, pick_device("cpu"), log, remote=stage_runner(cluster, device))
        scheduler = RayScheduler(plan, cluster, device, shard_bytes, progress)
        stats = scheduler.run()
        if staged:
            from ..stages.run import learned_by_output

            stats.learned = learned_by_output(scheduler.plan)
        return stats
    finally:
        cluster.close()


def _stage_task(env: dict, stage: dict, names: list[str], device: str, threads: int, at: tuple | None):
    """One model stage's result on a worker (`stages.process.compute_job`); its progress
    lines go to the worker's stderr, which Ray shows on the driver's."""
    from ..stages.process import compute_job

    RC.use_env(env)
    _maybe_crash_for_test()
    return compute_job(stage, names, device, threads, at)


def stage_runner(cluster: RC.Cluster, device: str):
    """`run_stages`' `remote`: computes the given stage jobs [(stage, tensor names, key, at)]
    as Ray tasks, all at once, each asking for the memory its estimate names and every
    CPU of one node at most (stages are multi-threaded); yields (job, result)."""
    import ray

    remote = ray.remote(_stage_task)
    gpu = device == "cuda" or (device == "auto" and cluster.gpus > 0)

    def run(jobs):
        jobs = list(jobs)
        env = RC.driver_env()
        # the cluster's CPUs shared among the stages, a node's at most (stages are multi-threaded)
        threads = max(1, min(cluster.node_cpus or 1, cluster.cpus // max(1, len(jobs))))

        def submit(job):
            stage, names, _key, at = job
            peak = int(stage.get("estimate", {}).get("peak_bytes", 0)) + TASK_BASE_MEMORY
            opts = {"max_retries": RC.MAX_RETRIES, "num_cpus": threads, "num_gpus": 1 if gpu else 0,
                    "memory": min(peak, cluster.node_memory) if cluster.node_memory else peak}
            return remote.options(**opts).remote(env, stage, names, device, threads, at)

        yield from RC.imap_unordered(submit, jobs, len(jobs), lambda job: f"the {job[0]['kind']} stage")

    run.where = "as Ray tasks"
    return run
