"""Constant folding and algebraic simplification of scalar chains; fuses add+scale."""

from __future__ import annotations

from ..ops.arith import weights_sum_is_zero
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
    if n.op in ("sum", "mean", "weighted"):
        return _chain(plan, n)
    if n.op == "add":
        a, b = (plan.nodes[i] for i in n.inputs)
        # NOTE: y + k*x as one fused axpy: one pass over memory, no temporary for k*x.
        if b.op == "scale":
            return ("axpy", (n.inputs[0], b.inputs[0]), (("k", b.param("k")),))
        if a.op == "scale":
            return ("axpy", (n.inputs[1], a.inputs[0]), (("k", a.param("k")),))
    return None


def _chain(plan: Plan, n: PlanNode):
    """sum / mean / weighted over n inputs -> a left fold of binary adds.

    NOTE: with the depth-first schedule, a chain lets the executor finish one input
    (load, subtract, ...) and add it into the accumulator before starting the next, so
    live memory stays flat as the number of models grows; the n-ary op would need all n
    inputs at once. The accumulation order is the n-ary op's, so results are identical.
    """
    xs = list(n.inputs)
    if n.op == "weighted":
        ws = list(n.param("weights"))
        total = sum(ws)
        normalize = n.param("normalize", True)
        if normalize and weights_sum_is_zero(ws):
            return None  # lowering reports this (E006); left to the op, which refuses it
        if len(xs) == 1:
            # one model: w x, or w x / w = x when normalized (never the chain below, whose
            # last axpy would add the first input a second time)
            k = ws[0] / total if normalize else ws[0]
            return xs[0] if k == 1.0 else ("scale", (xs[0],), (("k", k),))
        acc = plan.add("scale", (xs[0],), {"k": ws[0]}, group=n.group, loc=n.loc, shape=n.shape)
        for x, w in zip(xs[1:-1], ws[1:-1]):
            acc = plan.add("axpy", (acc, x), {"k": w}, group=n.group, loc=n.loc, shape=n.shape)
        if normalize:
            acc = plan.add("axpy", (acc, xs[-1]), {"k": ws[-1]}, group=n.group, loc=n.loc, shape=n.shape)
            return ("scale", (acc,), (("k", 1.0 / total),))
        return ("axpy", (acc, xs[-1]), (("k", ws[-1]),))
    acc = xs[0]
    for x in xs[1:-1]:
        acc = plan.add("add", (acc, x), {}, group=n.group, loc=n.loc, shape=n.shape)
    if n.op == "mean":
        acc = plan.add("add", (acc, xs[-1]), {}, group=n.group, loc=n.loc, shape=n.shape)
        return ("scale", (acc,), (("k", 1.0 / len(xs)),))
    return ("add", (acc, xs[-1]), ())


def fold(plan: Plan) -> Plan:
    """Fold scale(x, 1), scale(scale(x, a), b), one-element sums; fuse y + k*x; turn
    n-ary sums into chains of adds."""
    return rebuild(plan, _rule)
