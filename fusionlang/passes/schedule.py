"""Scheduling: split the plan into phases at reduce nodes and order the work.

A map node runs inside its tensor group; a reduce node (a model-wide statistic)
needs every group's input, so whatever consumes it runs in a later phase. Map nodes
needed in several phases are recomputed there (their inputs are re-read): streaming
keeps memory bounded by one tensor group instead of holding values across phases.
"""

from __future__ import annotations

from ..ops import OPS
from ..plan.graph import Plan


def phases(plan: Plan) -> dict[str, int]:
    ph: dict[str, int] = {}
    for nid in plan.topo_order():
        n = plan.nodes[nid]
        p = 0
        for i in n.inputs:
            p = max(p, ph[i] + (1 if _is_reduce(plan, i) and not _is_reduce(plan, nid) else 0))
        ph[nid] = p
    return ph


def _is_reduce(plan: Plan, nid: str) -> bool:
    op = plan.nodes[nid].op
    return op in OPS and OPS[op].kind == "reduce"


def schedule(plan: Plan) -> Plan:
    """Order nodes by (phase, group, topological position); records `plan.order`."""
    out = plan.copy()
    ph = phases(out)
    topo = {nid: i for i, nid in enumerate(out.topo_order())}
    group_rank: dict[str, int] = {}
    for o in out.outputs.values():
        for t in o.tensors:
            group_rank.setdefault(t, len(group_rank))
    out.order = sorted(out.nodes, key=lambda n: (ph[n], _is_reduce(out, n), group_rank.get(out.nodes[n].group, 1 << 30),
                                                 out.nodes[n].group, topo[n]))
    out.phase_of = ph
    return out
