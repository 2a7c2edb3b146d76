"""What a plan would cost on N workers: bytes, memory and time on paper (no torch).

`fusionlang compile SPEC --estimate-cluster N` prints `estimate_cluster(plan, N, ...)`
next to the same plan on one machine. The cluster is the Ray executor's
(`runtime/ray_scheduler.py`, `run --executor ray`), the machine the local one's:

- Each phase of the plan (`runtime.units.plan_phases`) is a list of units, one per
  tensor group; a phase starts when the previous one's reduces, computed on the
  driver, are done (a barrier).
- A unit runs on one CPU of a worker (a Ray node; `slots` CPUs each): it reads its
  input tensors from the models' safetensors files itself (shared storage: every worker
  sees the same paths), computes in fp32, and returns to the driver the output pieces it
  defines (in their output dtypes: the plan casts them) and the inputs of the phase's
  reduces (TIES' model-wide histograms). Values a unit hands to other units of its
  phase (a per-tensor statistic of a split tensor's row blocks) go worker to worker
  through Ray's object store: a few bytes, not counted.
- The driver receives every returned byte over its network link and writes every
  output shard to its own disk, both while the workers compute (results stream, at
  most 2 x CPUs tasks in flight).
- Units are handed out in the executor's order to whichever worker frees up first
  (Ray's dynamic scheduling; `placement="fifo"`), or longest first (`"lpt"`, for
  comparison). The executor batches consecutive small units into one task (about 32 MB
  of reads): for the tensors of large models a batch is one unit, so units are placed.
- A worker's memory is what Ray reserves for the tasks it runs at once: per task its
  unit's live fp32 values plus the values it returns, plus 256 MiB (`unit_memory`).
- A model stage (statistics, test-time training: `plan.sources[k].stage`) runs as one
  task before the units; its memory is its own estimate's `peak_bytes`.
- One machine is the local executor: one unit at a time with all its CPUs (`slots`)
  computing on it, its memory the largest unit's live values, nothing on a network.

Units: bytes are bytes; bandwidths are GB/s with **1 GB = 10⁹ bytes** (as disk and
network hardware is specified: 10 Gbit/s Ethernet is 1.25 GB/s); times are seconds.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

from ..lang.diagnostics import Diagnostic, FuseErrors, Span
from ..runtime import units
from ..runtime.sources import DTYPE_SIZES
from ..runtime.units import Unit, plan_phases
from .graph import Plan, shape_numel

GB = 1e9  # bytes: bandwidths and printed sizes use decimal gigabytes

# Default bandwidths (GB/s) of `compile --estimate-cluster`: a datacenter NVMe disk (or a
# parallel file system's share per node), 10 Gbit/s Ethernet, and the fp32 bytes one CPU
# core running a unit gets through (`estimate_cluster`'s `mem_gbps`). NOTE: measured with
# the local executor, one thread, inputs in the page cache, 8 experts of a 50M-parameter
# Llama (bench/make_workload.py) on this project's 2-core AMD EPYC: touched bytes / run
# time = 36 GB/s for task arithmetic (elementwise, in cached tiles), 12 for DARE-TIES,
# 8 for TIES (a top-k per tensor), 4.4 for TIES with the model-wide top-k (histograms).
# 10 is the middle of the merging methods; pass the method's own figure for a closer one.
DEFAULT_DISK_GBPS = 2.0
DEFAULT_NET_GBPS = 1.25
DEFAULT_MEM_GBPS = 10.0

# NOTE: as runtime/ray_scheduler.py (which imports torch): the memory a task asks for
# besides its unit's values (tests/test_cluster_estimate.py checks `unit_memory` against
# that module's), and the tasks in flight per CPU (`RayScheduler._run_phase`'s
# back-pressure: the results the driver may hold).
TASK_BASE_MEMORY = 256 << 20
IN_FLIGHT_PER_CPU = 2

# NOTE: values whose plan node has no shape are small statistics; these are the ones
# that are not a scalar (fusionlang/ops/sparsify.py: int64 bincounts of the float bit
# patterns' high 15 and low 16 bits; the model-wide top-k's two histogram passes).
# tests/test_cluster_estimate.py checks the sizes against the ops' real outputs.
UNSHAPED_VALUE_BYTES = {"magnitude_hist_hi": 32768 * 8, "magnitude_hist_lo": 65536 * 8}
SCALAR_BYTES = 8  # any other value without a shape: a threshold, a factor, a count
PLACEMENTS = ("fifo", "lpt")


@dataclass(frozen=True)
class UnitCost:
    """One unit's work. `read_bytes`: its `load` nodes' bytes on disk (a row block's
    rows only: `Plan.load_bytes`); `sent_bytes`: what it returns to the driver, each
    output value once in its output dtype and the reduces' inputs (UNSHAPED_VALUE_BYTES,
    fp32 otherwise); `output_bytes`: the output pieces it defines, as the driver writes
    them (a value saved twice counts twice); `touched_bytes`: the bytes its ops read and
    write, every op's inputs and output in fp32, a load's file bytes plus its fp32 copy;
    `peak_bytes`: its live fp32 values at most as the runner frees them
    (`Plan.peak_bytes`, the local executor's); `task_bytes`: the memory the Ray executor
    asks for it (`unit_memory`)."""

    phase: int
    group: str
    read_bytes: int
    sent_bytes: int
    output_bytes: int
    touched_bytes: int
    peak_bytes: int
    task_bytes: int


@dataclass(frozen=True)
class WorkerLoad:
    """What one worker does over the whole plan. Bytes as in `UnitCost`, summed over its
    units; `peak_bytes`: its `slots` largest `task_bytes` summed (one machine: its
    largest unit's `peak_bytes`), or its largest model stage's; seconds: `read_seconds`
    = read bytes / disk bandwidth, `compute_seconds` = touched bytes / (slots x memory
    bandwidth)."""

    index: int
    units: int
    read_bytes: int
    sent_bytes: int
    touched_bytes: int
    peak_bytes: int
    read_seconds: float
    compute_seconds: float
    stages: tuple[str, ...] = ()

    @property
    def busy_seconds(self) -> float:
        return self.read_seconds + self.compute_seconds


@dataclass(frozen=True)
class StageTask:
    """A model stage as one task: its source key, kind, memory (bytes, from the plan's
    estimate) and the worker it is placed on."""

    key: str
    kind: str
    peak_bytes: int
    worker: int


@dataclass(frozen=True)
class ClusterEstimate:
    """The cost of a plan on `workers` workers of `slots` CPUs each (one machine when
    `workers` is 1: the local executor, nothing on a network).

    `seconds` = max(`worker_seconds`, `receive_seconds`, `write_seconds`), where
    `worker_seconds` sums, over the phases, the slowest worker's busy time in that phase
    (or the phase's reads at the shared storage's bandwidth, when that is given and
    slower); `receive_seconds` = the bytes sent to the driver / network bandwidth (0 on
    one machine); `write_seconds` = the output bytes / disk bandwidth. `bottleneck` names
    the largest term. `driver_peak_bytes`: the results the driver may hold at once (the
    largest ones of as many tasks as it keeps in flight). Model stages run before the
    units and their time is not included (forward and backward passes over data:
    compute-bound, not a matter of bandwidth). `single` is the same plan on one machine
    at the same bandwidths (None when `workers` is 1: then it is this estimate itself,
    see `one_machine`)."""

    workers: int
    slots: int
    disk_gbps: float
    net_gbps: float
    mem_gbps: float
    storage_gbps: float | None
    placement: str
    phases: int
    units: int
    per_worker: tuple[WorkerLoad, ...]
    read_bytes: int  # every unit's reads: a tensor read in several phases counts once per phase
    sent_bytes: int  # what the workers return to the driver
    output_bytes: int  # what the driver writes: every output piece in its output dtype
    worker_seconds: float
    receive_seconds: float
    write_seconds: float
    seconds: float
    bottleneck: str
    driver_peak_bytes: int = 0
    stages: tuple[StageTask, ...] = ()
    single: ClusterEstimate | None = field(default=None, repr=False)

    @property
    def one_machine(self) -> ClusterEstimate:
        return self.single if self.single is not None else self

    @property
    def peak_bytes(self) -> int:
        """The most memory any worker needs (bytes)."""
        return max((w.peak_bytes for w in self.per_worker), default=0)


def check_cluster_args(workers: int, disk_gbps: float, net_gbps: float, mem_gbps: float,
                       storage_gbps: float | None = None, slots: int = 1) -> None:
    """Raise FuseErrors (E006 at `<command line>:1:1`, with a hint) for a worker or slot
    count below 1 or a bandwidth that is not a positive, finite number of GB/s."""
    diags = []
    where = Span("<command line>", 1, 1)
    for flag, n, what, example in (("--estimate-cluster", workers, "workers", 8),
                                   ("--slots", slots, "CPUs per worker (units it runs at once)", 8)):
        if n < 1:
            diags.append(Diagnostic("E006", f"{flag} must be at least 1, not {n}", where,
                                    f"a count of {what}, e.g. {flag} {example}"))
    for flag, v in (("--disk-gbps", disk_gbps), ("--net-gbps", net_gbps), ("--mem-gbps", mem_gbps),
                    ("--storage-gbps", storage_gbps)):
        if v is not None and (not math.isfinite(v) or v <= 0 or v * GB < 1):
            diags.append(Diagnostic("E006", f"{flag} must be a positive, finite bandwidth in GB/s, not {v:g}", where,
                                    f"GB/s, 1 GB = 10^9 bytes: e.g. {flag} 2 (10 Gbit/s Ethernet is 1.25)"))
    if diags:
        raise FuseErrors(diags)


def unit_memory(plan: Plan, unit: Unit) -> int:
    """Bytes the Ray executor asks for a unit's task (`runtime.units.unit_memory` plus
    TASK_BASE_MEMORY): its live fp32 values at most, the values it returns (fp32, 4 bytes
    for one without a shape) and the worker's own overhead per task."""
    return units.unit_memory(plan, unit) + TASK_BASE_MEMORY


def unit_costs(plan: Plan) -> list[UnitCost]:
    """Every unit of a scheduled plan (`passes.schedule` has run) with its cost, in the
    executors' order, phase by phase."""
    out_dtype = {(k, t): o.dtypes[t] for k, o in plan.outputs.items() for t in o.tensors}
    costs = []
    for phase in plan_phases(plan):
        for u in phase.units:
            read = touched = 0
            for nid in u.nodes:
                n = plan.nodes[nid]
                size = 4 * shape_numel(n.shape or ())
                if n.op == "load":
                    file_bytes = plan.load_bytes(nid)
                    read += file_bytes
                    touched += file_bytes + size
                else:
                    touched += size + sum(4 * shape_numel(plan.nodes[i].shape or ()) for i in n.inputs
                                          if plan.nodes[i].shape is not None)
            sent = output = 0
            for nid, pieces in u.writes.items():
                sizes = [DTYPE_SIZES.get(out_dtype[(okey, tensor)], 4) * shape_numel(plan.nodes[nid].shape or ())
                         for okey, tensor, _ in pieces]
                sent += sizes[0]  # the value, in the dtype its cast gave it
                output += sum(sizes)
            sent += sum(_value_bytes(plan, t) for t in u.targets if t not in u.writes and t not in u.exports)
            costs.append(UnitCost(phase.index, u.group, read, sent, output, touched, plan.peak_bytes(u.nodes),
                                  unit_memory(plan, u)))
    return costs


def estimate_cluster(plan: Plan, workers: int, disk_gbps: float = DEFAULT_DISK_GBPS,
                     net_gbps: float = DEFAULT_NET_GBPS, mem_gbps: float = DEFAULT_MEM_GBPS,
                     storage_gbps: float | None = None, slots: int = 1, placement: str = "fifo") -> ClusterEstimate:
    """The cost of running a scheduled plan's units on `workers` equal workers of `slots`
    CPUs each with the Ray executor, and (as `.single`) on one such machine with the
    local executor, at the same bandwidths.

    Bandwidths in GB/s, 1 GB = 10⁹ bytes:
    - `disk_gbps`: what one machine reads from the models' files per second (and, on the
      driver, writes to the outputs' disk); reads and writes do not contend (the driver's
      output disk is not the shared storage; on one machine a disk that does both needs
      (read + write) / bandwidth at least, which this does not add).
    - `net_gbps`: the driver's network link, which every returned byte crosses once.
    - `mem_gbps`: the fp32 bytes one CPU's ops read and write per second
      (`UnitCost.touched_bytes`): a throughput, not the DRAM's bandwidth, since the
      runner computes elementwise groups in tiles that stay in the CPU's cache
      (DEFAULT_MEM_GBPS says what was measured).
    - `storage_gbps`: the shared storage's aggregate read bandwidth over all workers;
      None: no limit (each worker reads at `disk_gbps`: local copies, a parallel file
      system).
    `slots`: CPUs per machine: a worker runs that many units at once (Ray tasks of one
    CPU), computing `slots` times as fast, its disk no faster; one machine computes one
    unit at a time on all of them. `placement`: "fifo" (the executor's order, to the
    first free worker) or "lpt" (longest first).

    Assumptions: each unit's reads and compute run one after the other (the runner
    reads a tensor as it computes on it, on the same thread); all workers start a phase
    together; an order inside a phase (a per-tensor statistic before the row blocks that
    take it) costs nothing, the phase's other units filling the wait; the phases'
    reduces, a task's overhead (milliseconds, per batch of small units) and the transfer
    of the reduces' inputs take no time; every op gets through fp32 bytes at the same
    rate (elementwise ops are faster than that, selections such as top-k and
    decompositions such as SVD slower: DEFAULT_MEM_GBPS says by how much); a tensor read
    in several phases, or by a whole-tensor statistic and again by its row blocks, is
    read from disk each time (on one machine the page cache may hold it: not credited;
    a tile statistic's second pass over a unit's inputs, DARE's L1 rescale, reads them
    from the page cache: not counted); model stages are placed by memory, largest first,
    and their time is not included.

    Raises FuseErrors (E006) for arguments `check_cluster_args` rejects; ValueError for
    a `placement` not in PLACEMENTS.
    """
    check_cluster_args(workers, disk_gbps, net_gbps, mem_gbps, storage_gbps, slots)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    costs = unit_costs(plan)
    stages = [(k, s.stage.get("kind", "stage"), int(s.stage.get("estimate", {}).get("peak_bytes", 0)))
              for k, s in plan.sources.items() if s.stage]
    single = _estimate(costs, stages, 1, disk_gbps, net_gbps, mem_gbps, storage_gbps, slots, placement)
    if workers == 1:
        return single
    est = _estimate(costs, stages, workers, disk_gbps, net_gbps, mem_gbps, storage_gbps, slots, placement)
    return replace(est, single=single)


def _estimate(costs: list[UnitCost], stages: list[tuple[str, str, int]], workers: int, disk_gbps: float,
              net_gbps: float, mem_gbps: float, storage_gbps: float | None, slots: int,
              placement: str) -> ClusterEstimate:
    disk, net, mem = disk_gbps * GB, net_gbps * GB, mem_gbps * GB * slots
    per_phase: dict[int, list[UnitCost]] = {}
    for c in costs:
        per_phase.setdefault(c.phase, []).append(c)
    assigned: list[list[UnitCost]] = [[] for _ in range(workers)]
    total_busy = [0.0] * workers
    worker_seconds = 0.0
    read_part = compute_part = storage_part = 0.0  # of worker_seconds: what the slowest worker spent it on
    for p in sorted(per_phase):
        units = per_phase[p]
        if placement == "lpt":
            units = sorted(units, key=lambda c: -(c.read_bytes / disk + c.touched_bytes / mem))  # stable: ties in order
        # the worker that frees up first: (busy in this phase, busy so far: evens out the phases, index)
        heap = [(0.0, total_busy[w], w) for w in range(workers)]
        heapq.heapify(heap)
        phase_read = [0.0] * workers
        phase_busy = [0.0] * workers
        for c in units:
            _, _, w = heapq.heappop(heap)
            assigned[w].append(c)
            phase_read[w] += c.read_bytes / disk
            phase_busy[w] += c.read_bytes / disk + c.touched_bytes / mem
            total_busy[w] += c.read_bytes / disk + c.touched_bytes / mem
            heapq.heappush(heap, (phase_busy[w], total_busy[w], w))
        slowest = max(range(workers), key=lambda w: (phase_busy[w], -w))
        at_storage = sum(c.read_bytes for c in units) / (storage_gbps * GB) if storage_gbps else 0.0
        if at_storage > phase_busy[slowest]:
            worker_seconds += at_storage
            storage_part += at_storage
        else:
            worker_seconds += phase_busy[slowest]
            read_part += phase_read[slowest]
            compute_part += phase_busy[slowest] - phase_read[slowest]
    stage_of: dict[int, list[tuple[str, str, int]]] = {w: [] for w in range(workers)}
    stage_tasks = []
    heap = [(0, w) for w in range(workers)]
    for key, kind, peak in sorted(stages, key=lambda s: (-s[2], s[0])):
        load, w = heapq.heappop(heap)
        stage_of[w].append((key, kind, peak))
        stage_tasks.append(StageTask(key, kind, peak, w))
        heapq.heappush(heap, (load + peak, w))
    cluster = workers > 1
    per_worker = []
    for w, mine in enumerate(assigned):
        read = sum(c.read_bytes for c in mine)
        touched = sum(c.touched_bytes for c in mine)
        units_peak = (sum(heapq.nlargest(slots, (c.task_bytes for c in mine))) if cluster
                      else max((c.peak_bytes for c in mine), default=0))
        per_worker.append(WorkerLoad(
            index=w, units=len(mine), read_bytes=read, sent_bytes=sum(c.sent_bytes for c in mine) if cluster else 0,
            touched_bytes=touched, peak_bytes=max(units_peak, max((s[2] for s in stage_of[w]), default=0)),
            read_seconds=read / disk, compute_seconds=touched / mem, stages=tuple(s[0] for s in stage_of[w])))
    output = sum(c.output_bytes for c in costs)
    sent = sum(c.sent_bytes for c in costs) if cluster else 0
    receive = sent / net
    write = output / disk
    who, driver = ("the workers'", "the driver's") if cluster else ("the machine's", "the machine's")
    # the worker term is the sum of its parts: it is named by the part that weighs most
    worker_part = max((storage_part, "the shared storage (all reads together)"),
                      (read_part, f"{who} disk reads"),
                      (compute_part, f"{who} compute (fp32 bytes at memory bandwidth)"))[1]
    seconds = max(worker_seconds, receive, write)
    if seconds <= 0:
        bottleneck = "nothing (the plan has no work)"
    elif seconds == worker_seconds:
        bottleneck = worker_part
    elif seconds == receive:
        bottleneck = f"{driver} network (receiving the results)"
    else:
        bottleneck = f"{driver} disk (writing the outputs)"
    in_flight = IN_FLIGHT_PER_CPU * workers * slots
    return ClusterEstimate(
        workers=workers, slots=slots, disk_gbps=disk_gbps, net_gbps=net_gbps, mem_gbps=mem_gbps,
        storage_gbps=storage_gbps, placement=placement, phases=len(per_phase), units=len(costs),
        per_worker=tuple(per_worker), read_bytes=sum(c.read_bytes for c in costs), sent_bytes=sent,
        output_bytes=output, worker_seconds=worker_seconds, receive_seconds=receive, write_seconds=write,
        seconds=seconds, bottleneck=bottleneck,
        driver_peak_bytes=sum(heapq.nlargest(in_flight, (c.sent_bytes for c in costs))) if cluster else 0,
        stages=tuple(stage_tasks))


def _value_bytes(plan: Plan, nid: str) -> int:
    n = plan.nodes[nid]
    if n.shape is None:
        return UNSHAPED_VALUE_BYTES.get(n.op, SCALAR_BYTES)
    return 4 * shape_numel(n.shape)



def print_estimate(console, est: ClusterEstimate) -> None:
    """Print `est` on a rich Console: a row per worker (min / median / max rows past
    PER_WORKER_ROWS workers), the driver's row and the one-machine row; then the
    expected time with its bottleneck, and the speed-up over one machine."""
    from rich.table import Table

    cpus = f"{est.slots} CPU{'s' * (est.slots != 1)}"
    t = Table(title=(f"cluster estimate: {est.workers} workers × {cpus} (Ray executor), and one machine of {cpus} "
                     "(local executor)" if est.workers > 1 else f"estimate: one machine of {cpus} (local executor)"),
              title_justify="left")
    for c in ("machine", "units", "in", "out", "memory", "seconds", "of which"):
        t.add_column(c, justify="right" if c in ("units", "in", "out", "memory", "seconds") else "left")
    one = est.one_machine
    if est.workers > 1:
        fields = ("units", "read_bytes", "sent_bytes", "peak_bytes", "read_seconds", "compute_seconds")

        def row(name: str, v: list) -> None:
            t.add_row(name, str(v[0]), human_bytes(v[1]), human_bytes(v[2]), human_bytes(v[3]), _s(v[4] + v[5]),
                      f"{_s(v[4])} read + {_s(v[5])} compute")

        if est.workers > PER_WORKER_ROWS:  # each column's own min, median and max
            columns = [sorted(getattr(w, f) for w in est.per_worker) for f in fields]
            for name, i in (("workers: min", 0), ("workers: median", est.workers // 2), ("workers: max", -1)):
                row(name, [c[i] for c in columns])
        else:
            for w in est.per_worker:
                row(f"worker {w.index}", [getattr(w, f) for f in fields])
        t.add_row("driver", "", human_bytes(est.sent_bytes), human_bytes(est.output_bytes),
                  human_bytes(est.driver_peak_bytes), _s(max(est.receive_seconds, est.write_seconds)),
                  f"{_s(est.receive_seconds)} receive ‖ {_s(est.write_seconds)} write", end_section=True)
    w = one.per_worker[0]
    t.add_row("one machine", str(w.units), human_bytes(w.read_bytes), human_bytes(one.output_bytes),
              human_bytes(w.peak_bytes), _s(one.seconds),
              f"{_s(w.read_seconds)} read + {_s(w.compute_seconds)} compute ‖ {_s(one.write_seconds)} write")
    console.print(t)
    console.print(f"[dim]in: the bytes a worker reads, the driver receives; out: the bytes a worker returns, the "
                  f"driver writes; memory: the tasks a worker runs at once (the results the driver holds); "
                  f"‖: overlapped. Disk {est.disk_gbps:g} GB/s, network {est.net_gbps:g} GB/s, memory "
                  f"{est.mem_gbps:g} GB/s per CPU" + (f", shared storage {est.storage_gbps:g} GB/s in all"
                                                     if est.storage_gbps else "") + "; 1 GB = 10^9 bytes.[/]",
                  soft_wrap=True)
    where = f"{est.workers} workers" if est.workers > 1 else "one machine"
    console.print(f"expected time on {where}: [bold]{human_duration(est.seconds)}[/] — bottleneck: {est.bottleneck}",
                  soft_wrap=True)
    if est.workers > 1:
        console.print(f"one machine: {human_duration(one.seconds)} — bottleneck: {one.bottleneck}; {est.workers} "
                      f"workers: {one.seconds / est.seconds if est.seconds > 0 else 1.0:.2g}× as fast, "
                      f"{human_bytes(est.peak_bytes)} of memory each at most (one machine: "
                      f"{human_bytes(one.peak_bytes)})", soft_wrap=True)
    console.print(f"[dim]{est.units} units in {est.phases} phase{'s' * (est.phases != 1)} (each phase ends when "
                  "its last unit does); a tensor read in several phases is read in each[/]", soft_wrap=True)
    if est.stages:
        console.print("[dim]model stages, run first (their time is not estimated): "
                      + ", ".join(f"{s.key} ({s.kind}, {human_bytes(s.peak_bytes)}"
                                  + (f", worker {s.worker}" if est.workers > 1 else "") + ")" for s in est.stages)
                      + "[/]", soft_wrap=True)


PER_WORKER_ROWS = 8  # more workers than this: min / median / max rows


def human_bytes(n: float) -> str:
    """Decimal units: '512 B', '1.50 MB', '141.1 GB', '1.27 TB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"


def _s(x: float) -> str:
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def human_duration(seconds: float) -> str:
    """'2 h 05 min (7512 s)', '3 min 20 s (200 s)', '0.42 s'."""
    if seconds < 60:
        return f"{seconds:.2g} s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    text = f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"
    return f"{text} ({round(seconds)} s)"
