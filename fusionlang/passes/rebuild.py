"""Shared machinery for rewriting passes: rebuild a plan in topological order."""

from __future__ import annotations

from collections.abc import Callable

from ..plan.graph import Plan, PlanNode

# A rule sees a node whose inputs are already rewritten and returns either an existing
# node id (an alias: the node is replaced by it) or a (op, inputs, params) triple.
Rule = Callable[[Plan, PlanNode], "str | tuple[str, tuple[str, ...], tuple] | None"]


def rebuild(plan: Plan, rule: Rule | None = None) -> Plan:
    """Re-add every node through hash-consing (so duplicates merge), applying `rule`."""
    out = plan.copy()
    out.nodes, out.hashcons = {}, True
    mapping: dict[str, str] = {}
    for nid in plan.topo_order():
        n = plan.nodes[nid]
        n2 = PlanNode(n.op, tuple(mapping[i] for i in n.inputs), n.params, n.group, n.loc, n.shape)
        res = rule(out, n2) if rule else None
        if isinstance(res, str):
            mapping[nid] = res
            continue
        op, inputs, params = res if res else (n2.op, n2.inputs, n2.params)
        if n.group == "" and "-" in nid:
            # reduce nodes keep their named ids (other nodes' params never embed them)
            from ..plan.graph import add_with_id

            mapping[nid] = add_with_id(out, nid, op, inputs, dict(params), group="", loc=n.loc)
        else:
            mapping[nid] = out.add(op, inputs, params, group=n.group, loc=n.loc, shape=n.shape)
    for o in out.outputs.values():
        o.tensors = {t: mapping[v] for t, v in o.tensors.items()}
        o.blocks = {t: [(a, mapping[v]) for a, v in parts] for t, parts in o.blocks.items()}
    return out
