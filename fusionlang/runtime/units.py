"""A scheduled plan as units of work (no torch).

A **phase** (the plan's split at model-wide reduce nodes, `passes.schedule`) is a list
of **units** followed by its reduce nodes. A unit is one tensor group: the targets it
computes (output tensors of this phase, values other groups of the phase take from it,
inputs of the phase's reduces), the nodes it evaluates for them (in plan order), the
values it takes from outside (by node id: reduce results of earlier phases, exports of
earlier units of the phase) and the output pieces it defines. Its inputs from disk are
its `load` nodes (source, tensor, rows): by reference, never by value.

A unit is computed by `runner.Runner` as a function of its outside values; the order
of units within a phase (`Phase.units`) is the local scheduler's, and any order that
runs an exporting unit before its consumers gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops import OPS
from ..plan.graph import Plan, shape_numel

# Elements above which a whole tensor's freed buffers are given back to the OS after its unit.
TRIM_HEAP_ELEMENTS = 1 << 22


@dataclass
class Unit:
    phase: int
    group: str
    targets: list[str]  # values this unit hands out: output pieces, exports, reduce inputs
    nodes: list[str]  # what it evaluates, in plan order (inputs before their users)
    outside: set[str]  # values it takes from other units (by node id)
    writes: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)  # node -> [(output key, tensor, first row)]
    exports: set[str] = field(default_factory=set)  # targets other units of the phase take
    trim_heap: bool = False  # whole tensors big enough that freed memory goes back to the OS afterwards

    def loads(self, plan: Plan) -> list[tuple[str, str, tuple[int, int] | None]]:
        """The unit's inputs from disk: (source key, tensor name, row block or None)."""
        return [(plan.nodes[n].param("source"), plan.nodes[n].param("tensor"), plan.nodes[n].param("rows"))
                for n in self.nodes if plan.nodes[n].op == "load"]


@dataclass
class Phase:
    index: int
    units: list[Unit]
    reduces: list[str]  # reduce nodes computed after every unit, from the units' targets


def unit_memory(plan: Plan, unit: Unit) -> int:
    """Bytes a unit holds while it is computed and its values are handed out: the plan's
    fp32 live-value peak plus the values it returns (fp32, 4 bytes for one without a
    shape): an upper bound, op-internal workspace not counted."""
    return plan.peak_bytes(unit.nodes) + sum(4 * shape_numel(plan.nodes[t].shape or ()) for t in unit.targets)


def decomposes(plan: Plan, unit: Unit) -> bool:
    """Whether the unit computes a matrix decomposition (an op registered `decomposes`)."""
    return any(OPS.get(plan.nodes[n].op) is not None and OPS[plan.nodes[n].op].decomposes for n in unit.nodes)


def closure(plan: Plan, targets, known) -> set[str]:
    """The nodes `targets` need, stopping at the node ids in `known`."""
    need: set[str] = set()
    stack = list(targets)
    while stack:
        nid = stack.pop()
        if nid in need or nid in known:
            continue
        need.add(nid)
        stack.extend(plan.nodes[nid].inputs)
    return need


def refcounts(plan: Plan, nodes: list[str], inside) -> dict[str, int]:
    """How many times each node of `inside` is taken as input by `nodes`."""
    rc: dict[str, int] = {}
    for nid in nodes:
        for i in plan.nodes[nid].inputs:
            if i in inside:
                rc[i] = rc.get(i, 0) + 1
    return rc


def order_groups(groups: list[str], deps: dict[str, set[str]]) -> list[str]:
    """Keep the given order, but run a group that exports a value before its consumers."""
    present, done, out = set(groups), set(), []

    def visit(g: str) -> None:
        if g in done:
            return
        done.add(g)
        for d in sorted(deps.get(g, ())):
            if d in present:
                visit(d)
        out.append(g)

    for g in groups:
        visit(g)
    return out


def output_roots(plan: Plan) -> dict[str, list[tuple[str, str, int]]]:
    """Root node -> the output pieces it defines: [(output key, tensor, first row)]."""
    roots: dict[str, list[tuple[str, str, int]]] = {}
    for okey, o in plan.outputs.items():
        for t in o.tensors:
            for first_row, nid in o.parts(t):
                roots.setdefault(nid, []).append((okey, t, first_row))
    return roots


def plan_phases(plan: Plan) -> list[Phase]:
    """Split a scheduled plan into phases of units, in the local order: within a phase,
    groups by their first target's plan position, exporters before their consumers."""
    order = plan.order or plan.topo_order()
    pos = {nid: i for i, nid in enumerate(order)}
    ph = plan.phase_of or {nid: 0 for nid in order}
    reduces = [nid for nid in order if OPS.get(plan.nodes[nid].op) is not None and OPS[plan.nodes[nid].op].kind == "reduce"]
    roots = output_roots(plan)
    # Values one group computes for others (a per-tensor statistic shared by the row
    # blocks of a split tensor) are kept for the rest of the phase.
    exports = {i for nid, n in plan.nodes.items() for i in n.inputs
               if plan.nodes[i].group and plan.nodes[i].group != n.group and nid not in reduces}
    group_deps: dict[str, set[str]] = {}
    for n in plan.nodes.values():
        for i in n.inputs:
            if i in exports:
                group_deps.setdefault(n.group, set()).add(plan.nodes[i].group)
    phases: list[Phase] = []
    reduced: set[str] = set()  # reduce results of earlier phases
    for p in range(max(ph.values(), default=0) + 1):
        targets = [nid for nid in roots if ph[nid] == p]
        targets += [nid for nid in exports if ph[nid] == p]
        targets += [i for r in reduces if ph[r] == p for i in plan.nodes[r].inputs if i not in reduced]
        by_group: dict[str, list[str]] = {}
        for t in targets:
            by_group.setdefault(plan.nodes[t].group, []).append(t)
        groups = order_groups(sorted(by_group, key=lambda g: min(pos[t] for t in by_group[g])), group_deps)
        shared: set[str] = set()
        units = []
        for g in groups:
            need = closure(plan, by_group[g], reduced | shared)
            nodes = sorted(need, key=pos.__getitem__)
            outside = {i for nid in nodes for i in plan.nodes[nid].inputs if i not in need}
            unit_exports = {t for t in by_group[g] if t in exports}
            units.append(Unit(
                phase=p, group=g, targets=by_group[g], nodes=nodes, outside=outside,
                writes={t: roots[t] for t in by_group[g] if t in roots and ph[t] == p},
                exports=unit_exports,
                trim_heap="@" not in g and any(plan.nodes[n].shape and shape_numel(plan.nodes[n].shape) > TRIM_HEAP_ELEMENTS
                                               for n in nodes)))
            shared |= unit_exports
        phase_reduces = [r for r in reduces if ph[r] == p]
        phases.append(Phase(p, units, phase_reduces))
        reduced |= set(phase_reduces)
    return phases
