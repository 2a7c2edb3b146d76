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


# Ops whose result is a small statistic: run them as soon as their inputs exist, so a
# whole-tensor value feeding several of them (one delta -> a top-k threshold and a DARE
# L1 factor) is freed at once instead of waiting for the other consumer's turn.
SMALL_RESULT_OPS = {"topk_threshold", "drop_l1_factor", "magnitude_hist_hi", "magnitude_hist_lo", "const"}


def depth_first(plan: Plan, roots: list[str]) -> dict[str, int]:
    """Post-order from the roots, inputs in their listed order: each input's subtree is
    finished before the next one starts, which keeps few values alive at once."""
    pos: dict[str, int] = {}
    consumers: dict[str, list[str]] = {}
    for nid, n in plan.nodes.items():
        if n.op in SMALL_RESULT_OPS:
            for i in n.inputs:
                consumers.setdefault(i, []).append(nid)

    def place(nid: str) -> None:
        pos[nid] = len(pos)
        for c in sorted(consumers.get(nid, ())):
            if c not in pos and all(i in pos for i in plan.nodes[c].inputs):
                place(c)

    for r in roots:
        stack = [(r, False)]
        while stack:
            nid, expanded = stack.pop()
            if nid in pos:
                continue
            if expanded:
                place(nid)
                continue
            stack.append((nid, True))
            for i in reversed(plan.nodes[nid].inputs):
                if i not in pos:
                    stack.append((i, False))
    return pos


def schedule(plan: Plan) -> Plan:
    """Order nodes by (phase, group, depth-first position); records `plan.order`."""
    out = plan.copy()
    ph = phases(out)
    roots = [nid for o in out.outputs.values() for t in o.tensors for _, nid in o.parts(t)]
    roots += [nid for nid in sorted(out.nodes) if _is_reduce(out, nid)]
    topo = depth_first(out, roots)
    for nid in out.topo_order():  # nodes no output needs (when dce is disabled)
        topo.setdefault(nid, len(topo))
    group_rank: dict[str, int] = {}
    for o in out.outputs.values():
        for t in o.tensors:
            for _, nid in o.parts(t):
                group_rank.setdefault(out.nodes[nid].group, len(group_rank))
    out.order = sorted(out.nodes, key=lambda n: (ph[n], _is_reduce(out, n), group_rank.get(out.nodes[n].group, 1 << 30),
                                                 out.nodes[n].group, topo[n]))
    out.phase_of = ph
    return out
