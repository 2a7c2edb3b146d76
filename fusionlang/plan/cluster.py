"""What a plan would cost on N workers: bytes, memory and time on paper (no torch).

`fusionlang compile SPEC --estimate-cluster N` prints `estimate_cluster(plan, N, ...)`
next to the same plan on one machine. The model is the Ray executor's
(../shared/DESIGN.md, "The executor as units"):

- Each phase of the plan (`runtime.units.plan_phases`) is a set of units, one per
  tensor group; a phase starts when the previous one's reduces are done (a barrier).
- A unit runs on one worker: it reads its input tensors from the models' safetensors
  files itself (shared storage: every worker sees the same paths), computes in fp32,
  and sends its output pieces, in their output dtypes, to the driver, and the small
  values other units or the phase's reduces take (histograms, per-tensor statistics).
- The driver receives every output byte over its network link and writes every output
  shard to its own disk; it overlaps both with the workers' computing (results stream).
- Units go to whichever worker is free: with equal workers that behaves like
  longest-processing-time-first (LPT), which is what is modelled, phase by phase.
- A model stage (statistics, test-time training: `plan.sources[k].stage`) runs as one
  task before the units; its memory is its own estimate's `peak_bytes`.

Units: bytes are bytes; bandwidths are GB/s with **1 GB = 10⁹ bytes** (as disk and
network hardware is specified: 10 Gbit/s Ethernet is 1.25 GB/s); times are seconds.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

from ..lang.diagnostics import Diagnostic, FuseErrors, Span
from ..runtime.sources import DTYPE_SIZES
from ..runtime.units import plan_phases
from .graph import Plan

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

# NOTE: values whose plan node has no shape are small statistics; these are the ones
# that are not a scalar (fusionlang/ops/sparsify.py: int64 bincounts of the float bit
# patterns' high 15 and low 16 bits; the model-wide top-k's two histogram passes).
# tests/test_cluster_estimate.py checks the sizes against the ops' real outputs.
UNSHAPED_VALUE_BYTES = {"magnitude_hist_hi": 32768 * 8, "magnitude_hist_lo": 65536 * 8}
SCALAR_BYTES = 8  # any other value without a shape: a threshold, a factor, a count


@dataclass(frozen=True)
class UnitCost:
    """One unit's work. `read_bytes`: its `load` nodes' bytes on disk (a row block's
    rows only); `output_bytes`: the output pieces it defines, in their output dtypes;
    `shared_bytes`: the values it hands to other units or to the phase's reduces (fp32,
    or UNSHAPED_VALUE_BYTES); `touched_bytes`: the bytes its ops read and write, every
    op's inputs and output in fp32, a load's file bytes plus its fp32 copy;
    `peak_bytes`: the live fp32 values of its tensor group at most (`group_peak_bytes`)."""

    phase: int
    group: str
    read_bytes: int
    output_bytes: int
    shared_bytes: int
    touched_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class WorkerLoad:
    """What one worker does over the whole plan. Bytes as in `UnitCost`, summed over its
    units; `sent_bytes` = output + shared bytes (to the driver); `peak_bytes`: the largest
    of its `slots` largest units' peaks summed and its model stages' peaks; seconds:
    `read_seconds` = read bytes / disk bandwidth, `compute_seconds` = touched bytes /
    (slots × memory bandwidth), `busy_seconds` their sum."""

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
    """The cost of a plan on `workers` workers (one machine when `workers` is 1: the
    driver computes the units itself and nothing crosses a network).

    `seconds` = max(`worker_seconds`, `receive_seconds`, `write_seconds`), where
    `worker_seconds` sums, over the phases, the slowest worker's busy time in that phase
    (or the phase's reads at the shared storage's bandwidth, when that is given and
    slower); `receive_seconds` = the bytes sent to the driver / network bandwidth (0 on
    one machine); `write_seconds` = the output bytes / disk bandwidth. `bottleneck` names
    the largest term. Model stages run before the units and their time is not included
    (forward and backward passes over data: compute-bound, not a matter of bandwidth).
    `single` is the same plan on one machine at the same bandwidths (None when
    `workers` is 1: then it is this estimate itself, see `one_machine`)."""

    workers: int
    slots: int
    disk_gbps: float
    net_gbps: float
    mem_gbps: float
    storage_gbps: float | None
    phases: int
    units: int
    per_worker: tuple[WorkerLoad, ...]
    read_bytes: int  # every unit's reads: a tensor read in several phases counts once per phase
    output_bytes: int  # what the driver writes: every output piece in its output dtype
    shared_bytes: int  # statistics and shared values sent to the driver besides the outputs
    worker_seconds: float
    receive_seconds: float
    write_seconds: float
    seconds: float
    bottleneck: str
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
    for flag, n in (("--estimate-cluster", workers), ("--slots", slots)):
        if n < 1:
            diags.append(Diagnostic("E006", f"{flag} must be at least 1, not {n}", where,
                                    f"a count of {'workers' if flag != '--slots' else 'units a worker runs at once'}, "
                                    f"e.g. {flag} {8 if flag != '--slots' else 1}"))
    for flag, v in (("--disk-gbps", disk_gbps), ("--net-gbps", net_gbps), ("--mem-gbps", mem_gbps),
                    ("--storage-gbps", storage_gbps)):
        if v is not None and (not math.isfinite(v) or v <= 0 or v * GB < 1):
            diags.append(Diagnostic("E006", f"{flag} must be a positive, finite bandwidth in GB/s, not {v:g}", where,
                                    f"GB/s, 1 GB = 10^9 bytes: e.g. {flag} 2 (10 Gbit/s Ethernet is 1.25)"))
    if diags:
        raise FuseErrors(diags)


def group_peak_bytes(plan: Plan) -> dict[str, int]:
    """Peak bytes of live values per tensor group, simulating the executor's order and
    frees (fp32 intermediates, no credit for in-place ops: an upper bound per group).
    A group computed in several phases is simulated over all its nodes at once."""
    order = plan.order or plan.topo_order()
    by_group: dict[str, list[str]] = {}
    for nid in order:
        by_group.setdefault(plan.nodes[nid].group, []).append(nid)
    peaks: dict[str, int] = {}
    for group, nodes in by_group.items():
        if not group:
            continue
        uses: dict[str, int] = {}
        for nid in nodes:
            for i in plan.nodes[nid].inputs:
                uses[i] = uses.get(i, 0) + 1
        alive: dict[str, int] = {}
        peak = 0
        for nid in nodes:
            n = plan.nodes[nid]
            alive[nid] = 4 * _numel(n.shape or ())
            peak = max(peak, sum(alive.values()))
            for i in n.inputs:
                if i in uses:
                    uses[i] -= 1
                    if uses[i] == 0:
                        alive.pop(i, None)
            if nid not in uses:
                alive.pop(nid, None)  # an output: written, then freed
        peaks[group] = peak
    return peaks


def unit_costs(plan: Plan) -> list[UnitCost]:
    """Every unit of a scheduled plan (`passes.schedule` has run) with its cost, in the
    local order, phase by phase."""
    peaks = group_peak_bytes(plan)
    out_dtype = {(k, t): o.dtypes[t] for k, o in plan.outputs.items() for t in o.tensors}
    costs = []
    for phase in plan_phases(plan):
        for u in phase.units:
            read = touched = 0
            for nid in u.nodes:
                n = plan.nodes[nid]
                size = 4 * _numel(n.shape or ())
                if n.op == "load":
                    file_bytes = _load_bytes(plan, n)
                    read += file_bytes
                    touched += file_bytes + size
                else:
                    touched += size + sum(4 * _numel(plan.nodes[i].shape or ()) for i in n.inputs
                                          if plan.nodes[i].shape is not None)
            output = sum(DTYPE_SIZES.get(out_dtype[(okey, tensor)], 4) * _numel(plan.nodes[nid].shape or ())
                         for nid, pieces in u.writes.items() for okey, tensor, _ in pieces)
            shared = sum(_value_bytes(plan, t) for t in u.targets if t not in u.writes)
            costs.append(UnitCost(phase.index, u.group, read, output, shared, touched, peaks.get(u.group, 0)))
    return costs


def estimate_cluster(plan: Plan, workers: int, disk_gbps: float = DEFAULT_DISK_GBPS,
                     net_gbps: float = DEFAULT_NET_GBPS, mem_gbps: float = DEFAULT_MEM_GBPS,
                     storage_gbps: float | None = None, slots: int = 1) -> ClusterEstimate:
    """The cost of running a scheduled plan's units on `workers` equal workers, and
    (as `.single`) on one machine at the same bandwidths.

    Bandwidths in GB/s, 1 GB = 10⁹ bytes:
    - `disk_gbps`: what one worker reads from the models' files per second (and, on the
      driver, writes to the outputs' disk); reads and writes do not contend (the driver's
      output disk is not the shared storage; on one machine a disk that does both needs
      (read + write) / bandwidth at least, which this does not add).
    - `net_gbps`: the driver's network link, which every output byte crosses once.
    - `mem_gbps`: the fp32 bytes one unit's ops read and write per second on one CPU
      (`UnitCost.touched_bytes`): a throughput, not the DRAM's bandwidth, since the
      runner computes elementwise groups in tiles that stay in the CPU's cache.
    - `storage_gbps`: the shared storage's aggregate read bandwidth over all workers;
      None: no limit (each worker reads at `disk_gbps`: local copies, a parallel file
      system).
    `slots`: units a worker runs at once (one per CPU it is given): its compute goes
    `slots` times as fast, its disk does not, and its memory is its `slots` largest
    units' peaks summed.

    Assumptions: each unit's reads and compute run one after the other (the runner
    reads a tensor as it computes on it, on the same thread); units are placed LPT
    by their busy time (read + compute seconds), phase by phase, all workers starting a
    phase together; an order inside a phase (a per-tensor statistic before the row
    blocks that take it) costs nothing, the phase's other units filling the wait; the
    phases' reduces (on the driver) and the transfer of a phase's statistics take no
    time; every op gets through fp32 bytes at the same rate (elementwise ops are faster
    than that, selections such as top-k and decompositions such as SVD slower:
    DEFAULT_MEM_GBPS says by how much); a tensor read in several phases is read from
    disk in each, as the local executor does (a tile statistic's second pass over a
    unit's inputs, DARE's L1 rescale, reads them from the page cache: not counted);
    model stages are placed LPT by memory and their time is not included.

    Raises FuseErrors (E006) for arguments `check_cluster_args` rejects.
    """
    check_cluster_args(workers, disk_gbps, net_gbps, mem_gbps, storage_gbps, slots)
    costs = unit_costs(plan)
    stages = [(k, s.stage.get("kind", "stage"), int(s.stage.get("estimate", {}).get("peak_bytes", 0)))
              for k, s in plan.sources.items() if s.stage]
    single = _estimate(costs, stages, 1, disk_gbps, net_gbps, mem_gbps, storage_gbps, slots)
    if workers == 1:
        return single
    est = _estimate(costs, stages, workers, disk_gbps, net_gbps, mem_gbps, storage_gbps, slots)
    return replace(est, single=single)


def _estimate(costs: list[UnitCost], stages: list[tuple[str, str, int]], workers: int, disk_gbps: float,
              net_gbps: float, mem_gbps: float, storage_gbps: float | None, slots: int) -> ClusterEstimate:
    disk, net, mem = disk_gbps * GB, net_gbps * GB, mem_gbps * GB * slots
    per_phase: dict[int, list[UnitCost]] = {}
    for c in costs:
        per_phase.setdefault(c.phase, []).append(c)
    assigned: list[list[UnitCost]] = [[] for _ in range(workers)]
    total_busy = [0.0] * workers
    worker_seconds = 0.0
    read_part = compute_part = storage_part = 0.0  # of worker_seconds: what the slowest worker spent it on
    for p in sorted(per_phase):
        units = sorted(per_phase[p], key=lambda c: (-(c.read_bytes / disk + c.touched_bytes / mem), c.group))
        # (busy in this phase, busy so far: evens out the workers over phases, index)
        heap = [(0.0, 0.0, w) for w in range(workers)]
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
    per_worker = []
    for w, mine in enumerate(assigned):
        read = sum(c.read_bytes for c in mine)
        touched = sum(c.touched_bytes for c in mine)
        biggest = heapq.nlargest(slots, (c.peak_bytes for c in mine))
        peak = max(sum(biggest), max((s[2] for s in stage_of[w]), default=0))
        per_worker.append(WorkerLoad(
            index=w, units=len(mine), read_bytes=read, sent_bytes=sum(c.output_bytes + c.shared_bytes for c in mine),
            touched_bytes=touched, peak_bytes=peak, read_seconds=read / disk, compute_seconds=touched / mem,
            stages=tuple(s[0] for s in stage_of[w])))
    output = sum(c.output_bytes for c in costs)
    shared = sum(c.shared_bytes for c in costs)
    receive = (output + shared) / net if workers > 1 else 0.0
    write = output / disk
    who, driver = ("the workers'", "the driver's") if workers > 1 else ("the machine's", "the machine's")
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
        bottleneck = f"{driver} network (receiving the outputs)"
    else:
        bottleneck = f"{driver} disk (writing the outputs)"
    return ClusterEstimate(
        workers=workers, slots=slots, disk_gbps=disk_gbps, net_gbps=net_gbps, mem_gbps=mem_gbps,
        storage_gbps=storage_gbps, phases=len(per_phase), units=len(costs), per_worker=tuple(per_worker),
        read_bytes=sum(c.read_bytes for c in costs), output_bytes=output, shared_bytes=shared,
        worker_seconds=worker_seconds, receive_seconds=receive, write_seconds=write, seconds=seconds,
        bottleneck=bottleneck, stages=tuple(stage_tasks))


def _load_bytes(plan: Plan, n) -> int:
    dtype, shape, _ = plan.sources[n.param("source")].tensors[n.param("tensor")]
    size = DTYPE_SIZES.get(dtype, 4) * _numel(shape)
    rows = n.param("rows")
    if rows is not None and shape:  # a block of rows (split pass)
        size = size // shape[0] * (rows[1] - rows[0])
    return size


def _value_bytes(plan: Plan, nid: str) -> int:
    n = plan.nodes[nid]
    if n.shape is None:
        return UNSHAPED_VALUE_BYTES.get(n.op, SCALAR_BYTES)
    return 4 * _numel(n.shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def print_estimate(console, est: ClusterEstimate) -> None:
    """Print `est` on a rich Console: a row per worker (min / median / max rows past
    PER_WORKER_ROWS workers), the driver's row and the one-machine row; then the
    expected time with its bottleneck, and the speed-up over one machine."""
    from rich.table import Table

    t = Table(title=f"cluster estimate: {est.workers} worker{'s' * (est.workers != 1)}"
              + (f" × {est.slots} slots" if est.slots > 1 else ""), title_justify="left")
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
        t.add_row("driver", "", human_bytes(est.output_bytes + est.shared_bytes), human_bytes(est.output_bytes), "",
                  _s(max(est.receive_seconds, est.write_seconds)),
                  f"{_s(est.receive_seconds)} receive ‖ {_s(est.write_seconds)} write", end_section=True)
    w = one.per_worker[0]
    t.add_row("one machine", str(w.units), human_bytes(w.read_bytes), human_bytes(one.output_bytes), human_bytes(w.peak_bytes),
              _s(one.seconds), f"{_s(w.read_seconds)} read + {_s(w.compute_seconds)} compute ‖ "
              f"{_s(one.write_seconds)} write")
    console.print(t)
    console.print(f"[dim]in: a worker's reads, the driver's receipts; out: a worker's results sent, the driver's "
                  f"writes; ‖: overlapped. Disk {est.disk_gbps:g} GB/s, network {est.net_gbps:g} GB/s, memory "
                  f"{est.mem_gbps:g} GB/s per CPU" + (f", shared storage {est.storage_gbps:g} GB/s in all"
                                                     if est.storage_gbps else "") + "; 1 GB = 10^9 bytes.[/]",
                  soft_wrap=True)
    console.print(f"expected time on {est.workers} worker{'s' * (est.workers != 1)}: [bold]{human_duration(est.seconds)}[/]"
                  f" — bottleneck: {est.bottleneck}", soft_wrap=True)
    if est.workers > 1:
        console.print(f"one machine: {human_duration(one.seconds)} — bottleneck: {one.bottleneck}; {est.workers} workers: "
                      f"{one.seconds / est.seconds if est.seconds > 0 else 1.0:.2g}× as fast, "
                      f"{human_bytes(est.peak_bytes)} of memory each at most (one machine: {human_bytes(one.peak_bytes)})",
                      soft_wrap=True)
    console.print(f"[dim]{est.units} units in {est.phases} phase{'s' * (est.phases != 1)} (each phase ends when "
                  "its last unit does); a tensor read in several phases is read in each[/]",
                  soft_wrap=True)
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
