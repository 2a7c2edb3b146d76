"""The run's executor, by name: "local" (`scheduler.run_plan`: this process) or "ray"
(`ray_scheduler.run_plan_on_ray`: Ray tasks on a cluster or a local instance). Both
write the same bytes and commit all outputs or none."""

from __future__ import annotations

from collections.abc import Callable

from ..plan.graph import Plan
from .sinks import DEFAULT_SHARD_BYTES

EXECUTORS = ("local", "ray")


def run_plan(plan: Plan, device: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
             progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None,
             executor: str = "local", address: str | None = None):
    """Run `plan` with `executor` (EXECUTORS); `address`: the Ray cluster (default
    $RAY_ADDRESS, else a local instance). Returns RunStats; raises RunError as
    `scheduler.run_plan`, and E032 when Ray is missing, unreachable or loses a task for good."""
    from .scheduler import run_plan as run_local
    from .scheduler import stderr_line

    if executor == "ray":
        from .ray_scheduler import run_plan_on_ray

        return run_plan_on_ray(plan, address, device, shard_bytes, progress, log or stderr_line)
    return run_local(plan, device, shard_bytes, progress, log)
