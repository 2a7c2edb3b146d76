"""Constant folding and algebraic simplification of scalar chains; fuses add+scale."""

from __future__ import annotations

from ..plan.graph import Plan, PlanNode
from .rebuild import rebuild


def _rule(plan: Plan, n: PlanNode):
    if n.op == "scale":
        k = n.param("k")
        if k == 1.0:
            return n.inputs[0]
        inner = plan.nodes[n.inputs[0]]
        if inner.op == "scale":
            return ("scale", inner.inputs, (("k", inner.param("k") * k),))
    if n.op in ("sum", "mean") and len(n.inputs) == 1:
        return n.inputs[0]
    if n.op == "add":
        a, b = (plan.nodes[i] for i in n.inputs)
        # NOTE: y + k*x as one fused axpy: one pass over memory, no temporary for k*x.
        if b.op == "scale":
            return ("axpy", (n.inputs[0], b.inputs[0]), (("k", b.param("k")),))
        if a.op == "scale":
            return ("axpy", (n.inputs[1], a.inputs[0]), (("k", a.param("k")),))
    return None


def fold(plan: Plan) -> Plan:
    """Fold scale(x, 1), scale(scale(x, a), b), one-element sums; fuse y + k*x."""
    return rebuild(plan, _rule)
