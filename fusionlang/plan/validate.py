"""Validation of a plan read back from JSON (`fusionlang run PLAN.json`).

A saved plan is a file a user may edit or damage; the executor trusts the plans the
compiler makes. `check_loaded_plan` stands between them: every op exists, every input
is a node defined earlier in the order, every parameter has its op's type, every load
names a declared source tensor, every output is complete. No torch import.
"""

from __future__ import annotations

import math

from ..ops import OPS
from .graph import Plan

SAVE_DTYPES = {None, "bf16", "fp16", "fp32"}
_LOAD_PARAMS = {"source": str, "tensor": str, "rows": tuple}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _param_ok(ptype: str, choices: tuple, optional: bool, v) -> bool:
    if v is None:
        return optional
    if ptype == "number":
        return _number(v)
    if ptype == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if ptype == "bool":
        return isinstance(v, bool)
    if ptype == "string":
        return isinstance(v, str) and (not choices or v in choices)
    if ptype == "numbers":
        return isinstance(v, tuple) and all(_number(x) for x in v)
    return False


def _node_problem(plan: Plan, nid: str, seen: set[str]) -> str | None:
    n = plan.nodes[nid]
    for i in n.inputs:
        if i not in plan.nodes:
            return f"node '{nid}' ({n.op}) takes '{i}', which the plan does not define"
        # the executor runs a group's nodes in plan order, and orders groups by what they export
        if i not in seen and plan.nodes[i].group == n.group:
            return f"node '{nid}' ({n.op}) takes '{i}' before it is computed (the order is not topological)"
        if plan.phase_of.get(i, 0) > plan.phase_of.get(nid, 0):
            return f"node '{nid}' ({n.op}) in phase {plan.phase_of.get(nid, 0)} takes '{i}' of a later phase"
    params = dict(n.params)
    if n.op == "load":
        if n.inputs or set(params) - set(_LOAD_PARAMS) or not {"source", "tensor"} <= set(params):
            return f"load node '{nid}' must have exactly the parameters source, tensor (and rows)"
        src = plan.sources.get(params["source"]) if isinstance(params["source"], str) else None
        if src is None or params["tensor"] not in src.tensors:
            return f"load node '{nid}' reads '{params['source']}'/'{params['tensor']}', which no source declares"
        rows = params.get("rows")
        if rows is not None and not (isinstance(rows, tuple) and len(rows) == 2
                                     and all(isinstance(r, int) and r >= 0 for r in rows) and rows[0] < rows[1]):
            return f"load node '{nid}' has invalid rows {rows!r}"
        return None
    op = OPS.get(n.op)
    if op is None:
        return f"node '{nid}' uses unknown op '{n.op}'"
    single = sum(1 for p in op.params if p.type == "tensor")
    listy = any(p.type == "tensors" for p in op.params)
    if len(n.inputs) < single + listy or (not listy and len(n.inputs) != single):
        return f"node '{nid}' ({n.op}) has {len(n.inputs)} inputs"
    specs = {p.name: p for p in op.value_params}
    n_lists = sum(1 for p in op.params if p.type == "tensors")
    if n_lists > 1:  # the inputs of several list parameters, and how many each takes
        sizes = params.pop("sizes", None)
        if not (isinstance(sizes, tuple) and len(sizes) == n_lists and all(isinstance(k, int) and k > 0 for k in sizes)
                and sum(sizes) + single == len(n.inputs)):
            return f"node '{nid}' ({n.op}) needs sizes: one count per list parameter, adding up to its inputs"
    for k, v in params.items():
        p = specs.get(k)
        if p is None:
            return f"node '{nid}' ({n.op}) has unknown parameter '{k}'"
        if not _param_ok(p.type, p.choices, p.optional, v):
            return f"node '{nid}' ({n.op}) has {k}={v!r}, not a valid {p.type}"
    if "weights" in params and params["weights"] is not None and listy and len(params["weights"]) != len(n.inputs) - single:
        return f"node '{nid}' ({n.op}) has {len(params['weights'])} weights for {len(n.inputs) - single} inputs"
    return None


def check_loaded_plan(plan: Plan) -> None:
    """Raise ValueError naming the first problem of a plan read from JSON.

    Checks: `plan.order` lists every node once, each after its inputs of the same tensor
    group, the graph has no cycle and no node takes a value of a later phase; each node's op is
    registered (or `load` of a declared source tensor) with its op's input count and
    parameter types (finite numbers, known choices); each output names a declared
    reference source, a known dtype and only defined nodes.
    """
    if sorted(plan.order) != sorted(plan.nodes) or len(set(plan.order)) != len(plan.order):
        raise ValueError("the node order does not list every node exactly once")
    if any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in plan.phase_of.values()):
        raise ValueError("a node's phase is not a non-negative integer")
    seen: set[str] = set()
    for nid in plan.order:
        problem = _node_problem(plan, nid, seen)
        if problem:
            raise ValueError(problem)
        seen.add(nid)
    plan.topo_order()  # ValueError on a cycle across groups
    for key, o in plan.outputs.items():
        if not isinstance(o.path, str) or not o.path:
            raise ValueError(f"output '{key}' has no path")
        if o.dtype not in SAVE_DTYPES:
            raise ValueError(f"output '{key}' has unknown dtype {o.dtype!r}")
        if o.reference not in plan.sources:
            raise ValueError(f"output '{key}' takes its config from '{o.reference}', which no source declares")
        for t in o.tensors:
            for _, nid in o.parts(t):
                if nid not in plan.nodes:
                    raise ValueError(f"output '{key}' tensor '{t}' comes from '{nid}', which the plan does not define")
