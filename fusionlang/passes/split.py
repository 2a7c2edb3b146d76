"""Row splitting: compute large tensors of elementwise merges in blocks of rows.

A tensor group whose ops are all row-wise (elementwise arithmetic, sign election, casts)
gives the same result computed on row blocks as on the whole tensor. Splitting the big
ones (embeddings, heads) bounds live memory by the block size instead of by the largest
tensor, so a merge's anonymous memory stays flat as models and vocabularies grow.
"""

from __future__ import annotations

from ..plan.graph import Plan
from .dce import dce

ROWWISE = {"load", "cast", "add", "sub", "mul", "scale", "axpy", "lerp", "disjoint_merge", "trim_at", "trim_topk",
           "drop_rows", "const",
           # elementwise or per-row selections and masks (MagMax, TALL, consensus, EMR, pruning)
           "max_magnitude", "tall_mask", "consensus_mask", "emr_unified", "emr_select", "prune_rows", "prune_n_m",
           "magnitude_prune"}
# Small per-tensor values computed from the whole tensor once, then shared by the blocks.
WHOLE_TENSOR_STATS = {"topk_threshold", "drop_l1_factor"}
BLOCK_ELEMENTS = 1 << 22  # 4M elements: 16 MB per fp32 value


def _closure(plan: Plan, root: str) -> list[str] | None:
    """The group's nodes under `root` (stopping at reduce nodes and whole-tensor
    statistics, which the blocks share), or None if any is not row-wise."""
    seen, stack, group = set(), [root], plan.nodes[root].group
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        n = plan.nodes[nid]
        if n.group != group or n.op in WHOLE_TENSOR_STATS:
            continue  # a reduce node or a per-tensor statistic: shared, not split
        if n.op == "const":
            continue
        if n.op not in ROWWISE or n.shape is None or len(n.shape) < 2:
            return None
        seen.add(nid)
        stack.extend(n.inputs)
    return list(seen) if seen else None


def split(plan: Plan, block_elements: int = BLOCK_ELEMENTS) -> Plan:
    """Replace each large row-wise output tensor by row blocks of at most `block_elements`."""
    out = plan.copy()
    topo = {nid: i for i, nid in enumerate(plan.topo_order())}
    for o in out.outputs.values():
        for t, root in list(o.tensors.items()):
            shape = o.shapes.get(t) or ()
            numel = 1
            for d in shape:
                numel *= d
            if len(shape) < 2 or numel <= block_elements:
                continue
            nodes = _closure(plan, root)
            if nodes is None:
                continue
            nodes.sort(key=topo.__getitem__)
            row = numel // shape[0]
            rows = max(1, block_elements // row)
            pieces = []
            for a in range(0, shape[0], rows):
                b = min(shape[0], a + rows)
                mapping: dict[str, str] = {}
                for nid in nodes:
                    n = plan.nodes[nid]
                    params = dict(n.params)
                    if n.op == "load":
                        params["rows"] = (a, b)
                    if n.op in ("trim_topk", "drop_rows"):
                        params["offset"] = a * row
                    new_shape = (b - a, *n.shape[1:])
                    mapping[nid] = out.add(n.op, tuple(mapping.get(i, i) for i in n.inputs), params,
                                           group=f"{n.group}@{a}", loc=n.loc, shape=new_shape)
                pieces.append((a, mapping[root]))
            o.blocks[t] = pieces
    return dce(out)
