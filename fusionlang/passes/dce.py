"""Dead-code elimination: only what a saved output needs is computed."""

from __future__ import annotations

from ..plan.graph import Plan


def dce(plan: Plan) -> Plan:
    """Drop nodes that no output depends on."""
    live = plan.ancestors(sorted(plan.roots()))
    out = plan.copy()
    out.replace_nodes({k: v for k, v in plan.nodes.items() if k in live})
    for o in out.outputs.values():
        for t in o.blocks:  # a tensor computed in row blocks keeps no whole-tensor node
            o.tensors[t] = o.blocks[t][0][1]
    return out
