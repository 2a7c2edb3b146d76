"""Plan -> Plan passes, run from one explicit, named list."""

from __future__ import annotations

from collections.abc import Callable

from ..plan.graph import Plan
from .cse import cse
from .dce import dce
from .fold import fold
from .schedule import schedule
from .split import split

# NOTE: `def`s are inlined while lowering (the evaluator expands their bodies), so the
# plan holds only primitives; these passes optimize that primitive graph.
PASSES: list[tuple[str, Callable[[Plan], Plan]]] = [
    ("fold", fold),
    ("cse", cse),
    ("dce", dce),
    ("split", split),
    ("schedule", schedule),
]
REQUIRED = {"schedule"}


def run_passes(plan: Plan, enabled: set[str] | None = None, dump_after: str | None = None,
               verify: bool = False, on_dump: Callable[[str, Plan], None] | None = None) -> Plan:
    """Run the pass list; `enabled=None` runs all. `schedule` always runs."""
    plan.history = [("lower", len(plan.nodes))]
    for name, fn in PASSES:
        if enabled is not None and name not in enabled and name not in REQUIRED:
            continue
        plan = fn(plan)
        plan.history.append((name, len(plan.nodes)))
        if verify:
            verify_plan(plan, name)
        if dump_after == name and on_dump:
            on_dump(name, plan)
    return plan


def verify_plan(plan: Plan, after: str) -> None:
    """Structural invariants; a failure is an internal error (a compiler bug)."""
    import networkx as nx

    assert nx.is_directed_acyclic_graph(plan.graph), f"cycle after {after}"
    for nid, n in plan.nodes.items():
        for i in n.inputs:
            assert i in plan.nodes, f"{nid} uses missing {i} after {after}"
    for o in plan.outputs.values():
        for t in o.tensors:
            for _, nid in o.parts(t):
                assert nid in plan.nodes, f"output {o.name}[{t}] undefined after {after}"


__all__ = ["PASSES", "run_passes", "verify_plan"]
