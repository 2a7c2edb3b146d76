"""The runner: computes a unit (`units.Unit`) from its inputs — a pure function of the
tensors it loads and the outside values it is given, whole or in cache-sized tiles.

Every value is computed in float32 on the run's device and freed after its last use
inside the unit; op results may reuse a dead input's memory (donation). The runner
writes nothing: it yields each target's value, and the scheduler routes it to a sink.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch

from ..ops import OPS, sparsify
from ..plan.graph import Plan, shape_numel
from .errors import BadValue, RunError
from .reader import TORCH_DTYPES, FileSpans, TensorReader
from .units import Unit, closure, refcounts

# Tiled execution: elements per tile (fp32: 256 KiB per value, a few live at once fit
# in a core's L2 cache), the pointwise ops it runs, and those that take a flat offset.
TILE = 1 << 16
TILE_OPS = {"load", "cast", "const", "sub", "add", "mul", "scale", "axpy", "lerp", "sum", "mean", "weighted",
            "trim_topk", "trim_at", "drop_rows", "disjoint_merge"}
OFFSET_OPS = {"trim_topk", "drop_rows"}
_LOAD, _CAST, _OP, _STAT = object(), object(), object(), object()


def check_cast(node: str, value: torch.Tensor, source: torch.Tensor) -> None:
    """Raise BadValue when the cast `value` of the float32 `source` is not all finite,
    or (float8_e4m3fn, which has no inf and saturates) when `source` overflows it.

    NOTE: the minimum and maximum are both finite exactly when every entry is (NaN
    propagates, ±inf is an extreme); `aminmax` reads the tensor once in its own dtype,
    twenty times faster than a float32 sum of a bf16 tensor and forty times faster than
    `isfinite(...).all()`, which allocates a bool per entry."""
    if not value.is_floating_point() or value.numel() == 0:
        return
    v = value.float() if value.itemsize == 1 else value  # fp8: no aminmax
    lo, hi = torch.aminmax(v)
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise BadValue(node, value, source)
    # NOTE: float8_e4m3fn has no inf and torch saturates to ±448: |x| >= 464 (which would round past 448) overflows
    if value.dtype == torch.float8_e4m3fn and bool((source.abs() >= 464).any()):
        raise BadValue(node, value, source)


def _one_thread(fn, args: list, kwargs: dict):
    """`fn(*args, **kwargs)` with one intra-op thread (BLAS too: ops.gram limits it to
    torch's count). A decomposition is computed on one thread wherever it runs, serially,
    side by side (scheduler "Decomposing phases") or on a Ray worker, so its bytes do not
    depend on the thread count: LAPACK's float32 SVD differs in the last bits between one
    and two threads."""
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _buffer(t: torch.Tensor) -> int:
    """The address of the memory a tensor's storage starts at (views share it)."""
    return t.untyped_storage().data_ptr()


def op_kwargs(n) -> dict:
    """A plan node's parameters as keyword arguments of its op (lists are stored as tuples)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in n.params}


def is_tile_stat(op: str) -> bool:
    """A per-tensor statistic the tiled executor sums tile by tile (e.g. DARE's L1 factor)."""
    return OPS.get(op) is not None and OPS[op].tile_stat is not None


class Runner:
    """Computes units of one plan on one device, reading inputs through `reader`."""

    def __init__(self, plan: Plan, device: torch.device, reader: TensorReader):
        self.plan = plan
        self.device = device
        self.reader = reader

    def apply(self, nid: str, args: list[torch.Tensor], donate: bool) -> torch.Tensor:
        """Node `nid` on its input values `args` (in input order). `donate`: the first
        input is dead afterwards, so an in-place op may write its result there. Raises
        BadValue for a cast that makes values non-finite, RunError for unreadable input."""
        n = self.plan.nodes[nid]
        if n.op == "load":
            return self.reader.load(n.param("source"), n.param("tensor"), n.param("rows"))
        if n.op == "cast":
            value = args[0].to(TORCH_DTYPES[n.param("dtype")])
            check_cast(nid, value, args[0])
            return value
        o = OPS[n.op]
        n_single = sum(1 for p in o.params if p.type == "tensor")
        kwargs = op_kwargs(n)
        # Inputs are stored flat, in parameter order; a list parameter takes the rest.
        call_args: list = []
        rest = list(args)
        # several list parameters: `sizes` says how many inputs each takes
        sizes = list(kwargs.pop("sizes", ()))
        for p in o.params:
            if p.type == "tensor":
                call_args.append(rest.pop(0))
            elif p.type == "tensors":
                k = sizes.pop(0) if sizes else len(args) - n_single
                call_args.append(rest[:k])
                rest = rest[k:]
        if o.inplace:
            kwargs["_inplace"] = donate
        try:
            if o.decomposes and self.device.type == "cpu":
                return _one_thread(o.fn, call_args, kwargs)
            return o.fn(*call_args, **kwargs)
        except RunError as e:
            if e.at is None and getattr(e, "node", None) is None:
                e.node = nid  # the scheduler locates it (`_locate`)
            raise

    def run(self, unit: Unit, shared: dict, reduce_values: dict) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """Compute `unit`, yielding (target, value, owned) as each target is ready.
        `shared` and `reduce_values` hold the unit's outside values (by node id). `owned`:
        nothing writes into the value's memory afterwards (a tile output buffer), so a
        sink may write it in the background."""
        copied = self._copy(unit)
        if copied is not None:
            yield copied
            return
        numel = self.tileable(unit, shared, reduce_values)
        if numel:
            for nid, value in self._run_tiled(unit.nodes, unit.targets, numel, shared, reduce_values):
                yield nid, value, True
            return
        plan = self.plan
        nodes = unit.nodes
        rc = refcounts(plan, nodes, set(nodes))
        keep = set(unit.targets)
        handed: set[int] = set()  # buffers of the values yielded so far
        vals: dict[str, torch.Tensor] = {}
        for nid in nodes:
            n = plan.nodes[nid]
            args = [vals[i] if i in vals else shared[i] if i in shared else reduce_values[i] for i in n.inputs]
            first = n.inputs[0] if n.inputs else None
            # NOTE: a value shares a yielded target's buffer when an op returned its input
            # (a cast to the dtype it has, karcher of one model, trim at density 1): no op
            # may update it in place afterwards, whichever node holds it (callers that
            # collect a unit's values, Ray's and side-by-side units, read them later)
            donate = first is not None and first in vals and rc.get(first, 0) == 1 and first not in keep \
                and n.inputs.count(first) == 1 and _buffer(vals[first]) not in handed
            vals[nid] = self.apply(nid, args, donate)
            for i in n.inputs:
                if i in rc:
                    rc[i] -= 1
                    if rc[i] == 0 and i not in keep:
                        vals.pop(i, None)
            if nid in keep:
                handed.add(_buffer(vals[nid]))
                yield nid, vals[nid], False
        vals.clear()

    def _copy(self, unit: Unit) -> tuple[str, torch.Tensor, bool] | None:
        """A unit that writes input tensors unchanged: a cast of a load to the dtype it has
        on disk (a rule `=> base`, a `slices` layer, a MoE expert), or of `stack_experts`
        over such loads (a fused MoE layer), as one copy of their bytes: no float32 round
        trip, which gives the same bits at three times the memory traffic. None for any
        other unit. Raises BadValue as the cast would.

        On the CPU the value is a `FileSpans` (the input files' byte ranges, checked
        finite in place), which the sink copies file to file; `FUSIONLANG_FILE_COPY=0`
        makes it a tensor as on other devices (the same bytes)."""
        if self.device.type != "cpu" or len(unit.targets) != 1 or unit.targets[0] != unit.nodes[-1] \
                or unit.nodes[-1] not in unit.writes:
            return None
        nodes = [self.plan.nodes[n] for n in unit.nodes]
        cast, loads = nodes[-1], nodes[:-1]
        stack = loads.pop() if loads and loads[-1].op == "stack_experts" else None
        if cast.op != "cast" or not loads or any(n.op != "load" for n in loads):
            return None
        if cast.inputs != ((unit.nodes[-2],) if stack is not None else (unit.nodes[0],)) or (
                stack is None and len(loads) != 1):
            return None
        if stack is not None and set(stack.inputs) != set(unit.nodes[:-2]):
            return None
        dtype = TORCH_DTYPES[cast.param("dtype")]
        where = {nid: (n.param("source"), n.param("tensor"), n.param("rows")) for nid, n in zip(unit.nodes, loads)}
        views = {nid: self.reader.view(*w) for nid, w in where.items()}
        if any(v.dtype != dtype or v.itemsize == 1 for v in views.values()):
            return None  # a real cast (or fp8, whose range check needs the float32 values)
        if os.environ.get("FUSIONLANG_FILE_COPY") != "0":
            # NOTE: the experts' parts concatenated along rows and stacked on a new first
            # axis are their bytes one after the other: the sink copies the file ranges
            order = list(stack.inputs) if stack is not None else [unit.nodes[0]]
            for i in order:
                check_cast(unit.nodes[-1], views[i], views[i])
            spans = tuple(self.reader.span(*where[i]) for i in order)
            return unit.nodes[-1], FileSpans(spans, tuple(cast.shape or ())), True
        value = (OPS["stack_experts"].fn([views[i] for i in stack.inputs], **op_kwargs(stack)) if stack is not None
                 else next(iter(views.values())).clone())
        check_cast(unit.nodes[-1], value, value)
        return unit.nodes[-1], value, True

    def nonfinite_input(self, nodes, name: str | None = None, at: tuple | None = None) -> RunError | None:
        """E031 at the source call of the first input tensor read by `nodes` that holds
        NaN or inf, or None when they are all finite (a check made only after a failure:
        inputs are not scanned on the normal path). `name`: the output that reads them."""
        plan = self.plan
        for nid in sorted(nodes):
            n = plan.nodes[nid]
            if n.op != "load":
                continue
            try:
                view = self.reader.view(n.param("source"), n.param("tensor"), n.param("rows"))
            except RunError:
                continue
            if view.is_floating_point() and not bool(torch.isfinite(view := view.float() if view.itemsize == 1 else view).all()):
                bad = int((~torch.isfinite(view)).sum())
                src = plan.sources[n.param("source")]
                reads = f", which output '{name}' reads" if name is not None else ""
                return RunError(f"input model '{src.key}' has {bad} non-finite value{'s' * (bad != 1)} (NaN or inf) "
                                f"in tensor '{n.param('tensor')}'{reads}",
                                "repair or replace that model; a merge of non-finite weights is not a model", "E031",
                                src.at or at)
        return None

    # -- tiled execution of pointwise groups
    def tileable(self, unit: Unit, shared: dict, reduce_values: dict) -> int:
        """The element count of a unit that can run in cache-sized tiles, else 0.

        A unit qualifies when all its tensors have the same element count and every
        node is pointwise (the value at flat position i depends only on the inputs at
        position i, and on small per-tensor values from outside the unit) or a tile
        statistic (a per-tensor value summed tile by tile, e.g. DARE's L1 factor). It
        must compute only output tensors of this phase (all casts) and statistics.

        NOTE: other per-tensor statistics (a top-k threshold) need their input whole;
        such groups run untiled, where each task vector is freed after its statistic.
        (Gathering them from tiles held every model's task vector at once: TIES with 4
        experts went from 0.6 to 1.0 GB anonymous.)
        """
        # NOTE: FUSIONLANG_NO_TILE=1 turns tiling off (A/B timing, debugging); results are the same.
        if self.device.type != "cpu" or os.environ.get("FUSIONLANG_NO_TILE"):
            return 0
        plan = self.plan
        numel = 0
        has_stats = False
        for nid in unit.nodes:
            n = plan.nodes[nid]
            if n.op == "const":
                continue
            if n.op not in TILE_OPS:
                if not is_tile_stat(n.op):
                    return 0
                has_stats = True
                continue  # a small value, computed from tensors of the unit (checked as its nodes)
            if n.shape is None:
                return 0
            k = shape_numel(n.shape)
            if numel and k != numel:
                return 0
            numel = k
            for i in n.inputs:
                if i in shared or i in reduce_values:
                    v = shared[i] if i in shared else reduce_values[i]
                    if v.numel() > 16:
                        return 0
        if numel <= TILE or (has_stats and TILE % sparsify.STAT_CHUNK):
            return 0
        if any(plan.nodes[i].op == "cast" for nid in unit.nodes for i in plan.nodes[nid].inputs):
            return 0  # a cast consumed inside the unit (tiles write casts straight to the output)
        for t in unit.targets:
            if is_tile_stat(plan.nodes[t].op):
                continue
            if t not in unit.writes or plan.nodes[t].op != "cast":
                return 0
        return numel

    def _run_tiled(self, nodes: list[str], targets: list[str], numel: int, shared: dict, reduce_values: dict):
        """Run a tileable unit tile by tile: every node on flat positions [s, s + TILE),
        then the next tile, so the intermediate values of a tile stay in the CPU cache
        instead of streaming whole tensors through memory once per op. Yields
        (target node, whole value) at the end.

        A unit with tile statistics runs in stages: stage 0 sums the statistics over
        the tiles, stage 1 recomputes the tile values it needs (cheap: the inputs are
        cached) and uses them, and so on.

        NOTE: pointwise ops give the same bits on a tile as on the whole tensor; ops that
        draw or select by flat position (DARE masks, top-k tie cuts) get the tile's
        offset, as row blocks do, and tile statistics sum the same fixed chunks.
        """
        plan = self.plan
        barriers = {nid for nid in nodes if is_tile_stat(plan.nodes[nid].op)}
        stage: dict[str, int] = {}
        for nid in nodes:  # nodes are in plan order: inputs first
            stage[nid] = max((stage[i] + (i in barriers) for i in plan.nodes[nid].inputs if i in stage), default=0)
        outside = {**reduce_values, **shared}
        outs: dict[str, torch.Tensor] = {}
        for k in range(max(stage.values(), default=0) + 1):
            wanted = [t for t in nodes if stage[t] == k and (t in barriers or t in targets)]
            need = closure(plan, wanted, outside)  # finished statistics are inputs now
            self._tile_stage([nid for nid in nodes if nid in need], numel, outside, outs)
        for nid in targets:
            yield nid, (outs[nid].view(plan.nodes[nid].shape) if nid in outs else outside[nid])

    def _tile_stage(self, nodes: list[str], numel: int, outside: dict, outs: dict) -> None:
        """One pass over the tiles of `nodes`: casts are written into `outs` (whole
        buffers); tile statistics are computed into `outside`."""
        plan = self.plan
        rc = refcounts(plan, nodes, set(nodes))
        prog = []
        partials: dict[str, list] = {}
        for nid in nodes:
            n = plan.nodes[nid]
            if n.op == "const":
                outside[nid] = self.apply(nid, [], False)
            elif n.op == "load":
                view = self.reader.view(n.param("source"), n.param("tensor"), n.param("rows")).reshape(-1)
                convert = view.dtype != torch.float32  # as load(): every input is computed in float32
                prog.append((nid, _LOAD, view.split(TILE), convert, None, None))
            elif n.op == "cast":
                outs[nid] = torch.empty(numel, dtype=TORCH_DTYPES[n.param("dtype")])
                prog.append((nid, _CAST, outs[nid].split(TILE), n.inputs[0], None, None))
            elif is_tile_stat(n.op):
                partials[nid] = []
                prog.append((nid, _STAT, OPS[n.op].tile_stat[0], n.inputs, op_kwargs(n), partials[nid]))
            else:
                o = OPS[n.op]
                kwargs = op_kwargs(n)
                offset0 = kwargs.pop("offset", 0) if n.op in OFFSET_OPS else None
                listy = any(q.type == "tensors" for q in o.params)
                first = n.inputs[0] if n.inputs else None
                can_donate = o.inplace and first is not None and first not in outside \
                    and n.inputs.count(first) == 1 and not listy
                prog.append((nid, _OP, o.fn, n.inputs, kwargs, (offset0, listy, can_donate)))
        # NOTE: loads and casts are pre-split into tile views (one C call instead of a
        # slice per tile and op: the per-op Python overhead is what tiles pay for).
        for j, s in enumerate(range(0, numel, TILE)):
            vals: dict[str, torch.Tensor] = {}
            left = dict(rc)
            for nid, kind, a, b, kwargs, extra in prog:
                if kind is _LOAD:
                    vals[nid] = a[j].float() if b else a[j].clone()
                    continue
                if kind is _CAST:
                    a[j].copy_(vals[b])
                    check_cast(nid, a[j], vals[b])
                    ins = (b,)
                elif kind is _STAT:
                    ins = b
                    extra.append(a(*[vals[i] if i in vals else outside[i] for i in ins], offset=s, **kwargs))
                else:
                    ins = b
                    offset0, listy, can_donate = extra
                    args = [vals[i] if i in vals else outside[i] for i in ins]
                    kw = kwargs
                    if offset0 is not None or can_donate:
                        kw = dict(kwargs)
                        if offset0 is not None:
                            kw["offset"] = offset0 + s
                        if can_donate:
                            kw["_inplace"] = left.get(ins[0], 0) == 1
                    vals[nid] = a(args, **kw) if listy else a(*args, **kw)
                for i in ins:
                    c = left.get(i)
                    if c is not None:
                        left[i] = c - 1
                        if c == 1:
                            vals.pop(i, None)
        for nid, parts in partials.items():
            outside[nid] = OPS[plan.nodes[nid].op].tile_stat[1](parts, **op_kwargs(plan.nodes[nid]))
