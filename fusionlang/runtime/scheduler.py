"""The local scheduler: runs a plan's units in order on this machine and routes their
results to the output sink (`run_plan`).

Phase by phase, unit by unit (`units.plan_phases`): the runner computes a unit from
its loads and the values earlier units handed out, each output piece goes to the sink
as soon as it is computed, and a phase ends with its reduce nodes (model-wide
statistics). Memory stays at one unit's values plus the phase's small shared values.

Short model stages (MoE routers from prompts: one forward pass of the base) run on a
background thread while the units that do not read their results run; the units that
do (and the units that take values from them) wait for the stages and run after the
others of their phase. Both threads compute with one intra-op thread meanwhile: two
OpenMP teams on the same cores slow each other down by an order of magnitude. Long
stages (statistics, test-time training) run first with every thread. Outputs are
written at fixed offsets, so the order gives the same bytes as any other.

Decomposing phases: LAPACK's SVD and eigensolvers spend much of their time in
memory-bound level-2 BLAS and gain little from a second thread (a 1536 × 4096 TSV-M
unit: 5.7 s on one thread, 4.0 s on two). A phase whose units compute a matrix
decomposition (ops registered `decomposes`) and share no values therefore runs its
units side by side, one thread each, as many at once as the run has threads and their
memory estimates (`units.unit_memory`, times DECOMPOSITION_WORKSPACE) fit in
`PARALLEL_MEMORY_SHARE` of the memory available; the main thread hands each finished
unit's values to the sink. Each unit is the same function of its inputs, so the bytes
are those of a one-thread run. `FUSIONLANG_PARALLEL_UNITS=0` turns this off (A/B
timing).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..plan.graph import Plan
from .errors import BadValue, RunError
from .reader import TensorReader, available_memory, keep_freed_memory, pick_device, trim_heap
from .runner import Runner
from .sinks import DEFAULT_SHARD_BYTES, OutputSink
from .staging import Stager, stage_ahead, staging_budget
from .units import Phase, Unit, closure, decomposes, output_roots, plan_phases, unit_memory


@dataclass
class RunStats:
    tensors_written: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    side_by_side: int = 0  # units computed side by side ("Decomposing phases")
    staged: int = 0  # input tensors read ahead by the stager (staging.py) and used
    staged_peak: int = 0  # the most bytes the stager held at once
    threads: int = 1  # the run's intra-op threads (the side-by-side workers)
    outputs: dict[str, str] = field(default_factory=dict)
    # what model stages learned (AdaMerging's coefficients), by output name
    learned: dict[str, list] = field(default_factory=dict)


# Stage kinds short enough to run beside the units (one forward pass, no training), in a
# separate process on the CPU (stages/process.py, waited for on a thread), on a thread on a
# GPU; the stage gets one intra-op thread while both run, the units the others.
BACKGROUND_STAGES = {"router"}

# Decomposing units side by side: at most this share of the memory available at the
# phase's start held by their estimates at once (one unit always runs), each unit's fp32
# estimate times DECOMPOSITION_WORKSPACE (float64 copies and factors inside the op: a
# 1536 x 4096 TSV-M unit of 4 task vectors holds ~2.2x its estimate).
PARALLEL_MEMORY_SHARE = 0.5
DECOMPOSITION_WORKSPACE = 3


class Background:
    """`fn(*args)` on a daemon thread (an interrupted run does not wait for it);
    `result()` waits for it and returns its value or raises its exception."""

    def __init__(self, fn: Callable, *args, threads: int | None = None):
        self._done = threading.Event()
        self._value = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                if threads:
                    torch.set_num_threads(threads)  # NOTE: OpenMP's thread count is per thread
                self._value = fn(*args)
            except BaseException as e:  # noqa: BLE001 (handed to the waiting thread)
                self._error = e
            finally:
                self._done.set()

        threading.Thread(target=target, daemon=True, name="fusionlang-stages").start()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class LocalScheduler:
    """Runs every unit of a plan in the local order on one device. `stages`: the plan's
    model stages running in the background (`Background` of `run_stages`), whose result
    is the plan with the stage sources computed; None when the plan has none."""

    def __init__(self, plan: Plan, device: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Callable[[int, int], None] | None = None, stages: Background | None = None):
        self.plan = plan
        self.stages = stages
        self.stage_sources = {k for k, s in plan.sources.items() if s.stage} if stages else set()
        self._threads = torch.get_num_threads()
        self.device = pick_device(device)
        self.shard_bytes = shard_bytes
        self.progress = progress
        self.reader = TensorReader(plan, self.device)
        self.runner = Runner(plan, self.device, self.reader)
        self.stats = RunStats()
        self._unit: Unit | None = None
        self._queued = 0  # units handed to the stager so far (their numbers)

    def run(self) -> RunStats:
        """Execute the plan; writes every output atomically. Raises RunError."""
        import gc

        # NOTE: the tile loop allocates many short-lived containers and makes no reference
        # cycles worth collecting; the cyclic collector took ~3% of a DARE run's py-spy samples.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            if stage_ahead(self.device):
                self.reader.stager = Stager(self.reader, self.device, staging_budget(self.device))
            return self._run()
        finally:
            stager, self.reader.stager = self.reader.stager, None
            if stager is not None:
                self.stats.staged, self.stats.staged_peak = stager.taken, stager.peak
                stager.close()
            torch.set_num_threads(self._threads)  # also when a stage or a unit failed mid-overlap
            if was_enabled:
                gc.enable()

    def _run(self) -> RunStats:
        t0 = time.perf_counter()
        keep_freed_memory()
        plan = self.plan
        phases = plan_phases(plan)
        total = sum(len(w) for ph in phases for u in ph.units for w in u.writes.values())
        sink = OutputSink(plan, self.shard_bytes)
        try:
            sink.open()
            self._written, self._total = 0, total
            reduce_values: dict[str, torch.Tensor] = {}
            for phase in phases:
                stat_inputs = self._run_phase(phase, reduce_values, sink)
                for r in phase.reduces:
                    args = [stat_inputs[i] if i in stat_inputs else reduce_values[i] for i in plan.nodes[r].inputs]
                    reduce_values[r] = self.runner.apply(r, args, False)
            self._await_stages()
            sink.commit()
            for okey, o in plan.outputs.items():
                self.stats.outputs[okey] = o.path
            self.stats.tensors_written = sum(len(o.tensors) for o in plan.outputs.values())
        except BadValue as e:
            sink.abort()
            raise self._value_error(e) from None
        except RunError as e:
            sink.abort()
            if e.at is None and self._unit is not None:
                self._locate(e, plan, self._unit)
            raise
        except (KeyboardInterrupt, SystemExit):
            sink.abort()
            raise
        except Exception:
            # NOTE: an op may fail on NaN inputs (e.g. a top-k that cannot find its
            # threshold): report the non-finite input rather than the op's failure
            sink.abort()
            bad_input = self.runner.nonfinite_input(self._unit.nodes) if self._unit else None
            if bad_input is not None:
                raise bad_input from None
            raise
        except BaseException:
            sink.abort()
            raise
        self.stats.bytes_read = self.reader.bytes_read
        self.stats.threads = self._threads
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _run_phase(self, phase: Phase, reduce_values: dict, sink: OutputSink) -> dict[str, torch.Tensor]:
        """Compute a phase's units, writing their output pieces to `sink`; returns the
        inputs of the phase's reduce nodes (by node id)."""
        shared: dict[str, torch.Tensor] = {}  # exports of this phase's units
        stat_inputs: dict[str, torch.Tensor] = {}
        if self._side_by_side(phase):
            self._run_side_by_side(phase, reduce_values, sink, stat_inputs)
            return stat_inputs
        order = list(self._order(phase.units))
        numbers = self._read_ahead(order, 0)
        for k, unit in enumerate(order):
            if unit is None:
                self._await_stages()
                numbers.update(self._read_ahead(order, k + 1))  # their inputs may be stage results
                continue
            self._unit = unit
            for nid, value, owned in self.runner.run(unit, shared, reduce_values):
                if nid in unit.exports:
                    shared[nid] = value
                self._deliver(unit, nid, value, owned, stat_inputs, sink)
            if k in numbers:
                self.reader.stager.finish(numbers[k])
            if unit.trim_heap:
                trim_heap()
        return stat_inputs

    def _read_ahead(self, order: list, start: int) -> dict[int, int]:
        """Hand the stager the units order[start:] up to the next None (those after it
        wait for the stages), in the order they run; their numbers by position."""
        numbers: dict[int, int] = {}
        if self.reader.stager is None:
            return numbers
        for k in range(start, len(order)):
            if order[k] is None:
                break
            numbers[k] = self._queued
            self.reader.stager.ahead(self._queued, order[k].loads(self.plan))
            self._queued += 1
        return numbers

    def _side_by_side(self, phase: Phase) -> bool:
        """Whether the phase's units run side by side ("Decomposing phases" above): a
        CPU run with several threads and no background stage, units that share no
        values, at least two of them computing a matrix decomposition."""
        if (self.device.type != "cpu" or self._threads < 2 or self.stages is not None or len(phase.units) < 2
                or os.environ.get("FUSIONLANG_PARALLEL_UNITS") == "0"):
            return False
        if any(u.exports for u in phase.units):
            return False
        return sum(1 for u in phase.units if decomposes(self.plan, u)) >= 2

    def _run_side_by_side(self, phase: Phase, reduce_values: dict, sink: OutputSink, stat_inputs: dict) -> None:
        """Compute the phase's units on `self._threads` worker threads of one intra-op
        thread each (BLAS too), admitted in order while their memory estimates fit the
        budget; deliver each unit's values on this thread as it finishes. A failed unit
        stops the admissions and its error is raised here once the workers still
        computing have finished their unit (their results are dropped)."""
        from ..ops.gram import blas_threads

        units = phase.units
        sizes = [unit_memory(self.plan, u) * (DECOMPOSITION_WORKSPACE if decomposes(self.plan, u) else 1) for u in units]
        budget = max(max(sizes), int(PARALLEL_MEMORY_SHARE * available_memory()))
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()

        def worker() -> None:
            torch.set_num_threads(1)
            while (i := todo.get()) is not None:
                try:
                    done.put((i, list(self.runner.run(units[i], {}, reduce_values)), None))
                except BaseException as e:  # noqa: BLE001 (raised on the main thread)
                    done.put((i, None, e))

        workers = min(self._threads, len(units))
        threads = [threading.Thread(target=worker, daemon=True, name="fusionlang-unit") for _ in range(workers)]
        for t in threads:
            t.start()
        held, running, nxt = 0, 0, 0
        try:
            with blas_threads(1):
                while nxt < len(units) or running:
                    while nxt < len(units) and running < workers and (not running or held + sizes[nxt] <= budget):
                        todo.put(nxt)
                        held, running, nxt = held + sizes[nxt], running + 1, nxt + 1
                    i, values, error = done.get()
                    held, running = held - sizes[i], running - 1
                    self._unit = units[i]
                    if error is not None:
                        raise error
                    for nid, value, owned in values:
                        self._deliver(units[i], nid, value, owned, stat_inputs, sink)
                    del values
                    self.stats.side_by_side += 1
                    if units[i].trim_heap:
                        trim_heap()
        finally:
            while not todo.empty():  # after a failure: start no other unit
                todo.get_nowait()
            for _ in range(workers):
                todo.put(None)
            # NOTE: after a failure the others finish their unit first: a process that
            # exits while a thread is inside torch's C++ code aborts ("terminate called")
            for t in threads:
                t.join()
            torch.set_num_threads(self._threads)

    def _deliver(self, unit: Unit, nid: str, value: torch.Tensor, owned: bool, stat_inputs: dict,
                 sink: OutputSink) -> None:
        """Route a unit's computed value: its output pieces to the sink (with progress), a
        reduce node's input to `stat_inputs` (an export is kept by the caller)."""
        if nid not in unit.exports and nid not in unit.writes:
            stat_inputs[nid] = value
        for okey, tensor, first_row in unit.writes.get(nid, ()):
            self.stats.bytes_written += sink.write(okey, tensor, value, first_row, owned)
            self._written += 1
            if self.progress:
                self.progress(self._written, self._total)

    def _order(self, units: list[Unit]):
        """A phase's units: while stages run, first those that need no stage result, then
        None (wait for the stages here), then the others in their order."""
        if self.stages is None:
            yield from units
            return
        torch.set_num_threads(max(1, self._threads - 1))  # the stage computes on one other core
        later, waiting = [], set()
        for u in units:
            if u.outside & waiting or any(src in self.stage_sources for src, _, _ in u.loads(self.plan)):
                later.append(u)
                waiting |= set(u.targets)
            else:
                yield u
        yield None
        yield from later

    def _await_stages(self) -> None:
        """Wait for the background stages; the rest of the run reads the plan whose
        stage sources they computed."""
        if self.stages is None:
            return
        try:
            plan = self.stages.result()
        finally:
            torch.set_num_threads(self._threads)
        self.stages = None
        self.plan = self.reader.plan = self.runner.plan = plan

    @staticmethod
    def _locate(e: RunError, plan, unit: Unit) -> None:
        """Locate an op's failure (a RunError raised without a place) at the save of the
        output the unit computes, naming the tensor and the spec line of the computation."""
        for o in plan.outputs.values():
            for tensor, nid in o.tensors.items():
                if plan.nodes[nid].group == unit.group:
                    node = getattr(e, "node", None)
                    failed = plan.nodes[node].loc if node in plan.nodes else ""
                    e.message += f" (tensor '{tensor}' of output '{o.name}'{', computed at ' + failed if failed else ''})"
                    e.at = o.at
                    return

    def _value_error(self, e: BadValue) -> RunError:
        """The located error for a non-finite output value: E031 at the source call of
        an input model that holds non-finite values where the output reads them, else
        E030 at the save when the cast overflowed (finite values beyond the dtype's
        range), else E031 at the save (the merge itself computed them)."""
        plan = self.plan
        okey, tensor, _ = output_roots(plan)[e.node][0]
        o = plan.outputs[okey]
        bad_input = self.runner.nonfinite_input(closure(plan, [e.node], ()), o.name, o.at)
        if bad_input is not None:
            return bad_input
        src = e.source
        if bool(torch.isfinite(src).all()):
            dtype = o.dtypes.get(tensor, "")
            top = float(src.abs().max())
            limit = torch.finfo(e.value.dtype).max
            return RunError(f"tensor '{tensor}' of output '{o.name}' does not fit in {dtype}: max |value| {top:.6g} "
                            f"> {limit:.6g}, the largest finite {dtype} value", "save it in a wider dtype "
                            "(e.g. `as fp32` or `as bf16`), or change the merge so its values stay in range", "E030", o.at)
        return RunError(f"tensor '{tensor}' of output '{o.name}' has non-finite values (NaN or inf) although its "
                        "inputs are finite", "check the merge's arguments (e.g. weights that cancel out, or a huge scale)",
                        "E031", o.at)


def run_plan(plan: Plan, device: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
             progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None) -> RunStats:
    """Run a plan with the local scheduler and commit all its outputs together
    (docs/language.md, "Where outputs go"). `progress(done, total)` is called after each
    piece written. Raises RunError: E016 (a save path that breaks a rule, an unwritable
    or uncommittable output), E030 (a value beyond the output dtype's range), E031 (NaN
    or inf in an output), E011 (an unreadable input); each located at its save or source
    call when the plan knows it. Nothing is left behind on any error or interruption.

    The plan's model stages (`stages.run.run_stages`: one model resident at a time,
    results cached on disk) run first, or, when all are short (`BACKGROUND_STAGES`), in a
    separate process while the units that need none of their results run; `log(line)`
    gets their progress lines (default: stderr)."""
    stages = None
    kinds = {s.stage["kind"] for s in plan.sources.values() if s.stage}
    if kinds:
        from ..stages.run import learned_by_output, run_stages

        # NOTE: seeded random routers read no model: drawn here, no process to start
        drawn = all(s.stage.get("reads_weights", True) is False for s in plan.sources.values() if s.stage)
        if kinds <= BACKGROUND_STAGES and not drawn:
            from ..stages.process import process_runner

            dev = pick_device(device)
            # NOTE: on a GPU the stage stays in this process: a child would hold a second
            # CUDA context and allocator cache beside the units'
            remote = process_runner(device, threads=1, log=log or stderr_line) if dev.type == "cpu" else None
            stages = Background(run_stages, plan, dev, log or stderr_line, remote, threads=1)
        else:
            plan = run_stages(plan, pick_device(device), log or stderr_line)
    scheduler = LocalScheduler(plan, device, shard_bytes, progress, stages)
    stats = scheduler.run()
    if kinds:
        stats.learned = learned_by_output(scheduler.plan)
    return stats


def stderr_line(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)
