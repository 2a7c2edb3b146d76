"""Common-subexpression elimination: re-hash-cons every node."""

from __future__ import annotations

from ..plan.graph import Plan
from .rebuild import rebuild


def cse(plan: Plan) -> Plan:
    """Merge nodes with equal (op, inputs, params, group)."""
    return rebuild(plan)
