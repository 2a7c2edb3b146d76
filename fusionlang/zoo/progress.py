"""Progress as plain lines, for logs, CI and pipes (where a live bar shows nothing).

A line is written when a step starts, when it finishes, and in between at most every
``interval`` seconds (default 10; ``$FUSIONLANG_PROGRESS_INTERVAL`` overrides it, 0 =
every update). Each line carries the elapsed time and ``done/total``; ``done`` never
passes ``total``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable

DEFAULT_INTERVAL = 10.0


def progress_interval(default: float = DEFAULT_INTERVAL) -> float:
    """Seconds between two periodic lines: ``$FUSIONLANG_PROGRESS_INTERVAL`` when it is a
    non-negative number, else ``default``."""
    try:
        v = float(os.environ.get("FUSIONLANG_PROGRESS_INTERVAL", ""))
    except ValueError:
        return default
    return v if math.isfinite(v) and v >= 0 else default


def stderr_writer(console=None) -> Callable[[str], None]:
    """A line writer: through a rich console (no markup) when given, else to stderr."""
    if console is not None:
        return lambda s: console.print(s, markup=False, highlight=False, soft_wrap=True)
    return lambda s: print(s, file=sys.stderr, flush=True)


class Heartbeat:
    """Throttled ``[elapsed] label: done/total unit`` lines for one long loop.

    ``beat(done, total)`` writes a line when ``interval`` seconds have passed since the
    last one, or when ``done == total`` and ``final`` is set; ``force=True`` always
    writes. ``done`` is clamped to ``[0, total]``."""

    def __init__(self, write: Callable[[str], None], label: str, unit: str = "", interval: float | None = None,
                 start: float | None = None, final: bool = True):
        self.write, self.label, self.unit, self.final = write, label, unit, final
        self.interval = progress_interval() if interval is None else interval
        self.t0 = time.monotonic() if start is None else start
        self.last = -float("inf")

    def beat(self, done: int, total: int | None, note: str = "", force: bool = False) -> bool:
        now = time.monotonic()
        finished = total is not None and done >= total
        if not (force or (finished and self.final) or now - self.last >= self.interval):
            return False
        self.last = now
        count = f"{max(0, min(done, total)) if total is not None else done}"
        if total is not None:
            count += f"/{total}"
        self.write(f"[{now - self.t0:7.1f}s] {self.label}: {count}{' ' + self.unit if self.unit else ''}"
                   + (f" ({note})" if note else ""))
        return True


class PlainProgress:
    """The subset of ``rich.progress.Progress`` that the zoo builders use (``add_task``,
    ``advance``, ``update``, ``remove_task``, ``log``), written as plain lines: a task's
    start, each new description, its end, and its count at most every ``interval`` seconds
    in between. For a console that is not a terminal, where rich shows no live bar."""

    def __init__(self, write: Callable[[str], None] | None = None, interval: float | None = None):
        self.write = write or stderr_writer()
        self.interval = progress_interval() if interval is None else interval
        self.t0 = time.monotonic()
        self.tasks: dict[int, dict] = {}
        self.last = -float("inf")

    def _line(self, tid: int) -> None:
        t = self.tasks[tid]
        self.last = time.monotonic()
        total = t["total"]
        count = f"{min(t['completed'], total)}/{total}" if total is not None else f"{t['completed']}"
        self.write(f"[{self.last - self.t0:7.1f}s] {t['description']}: {count}")
        t["shown"] = t["completed"]

    def add_task(self, description: str, total: int | None = None, **kw) -> int:
        self._next = getattr(self, "_next", 0) + 1
        tid = self._next
        self.tasks[tid] = {"description": description, "total": total, "completed": 0, "shown": None}
        self._line(tid)
        return tid

    def _changed(self, tid: int) -> None:
        t = self.tasks[tid]
        done = t["total"] is not None and t["completed"] >= t["total"]
        if (done and t["shown"] != t["completed"]) or time.monotonic() - self.last >= self.interval:
            self._line(tid)

    def advance(self, task_id: int, advance: int = 1) -> None:
        t = self.tasks.get(task_id)
        if t is None:
            return
        t["completed"] += advance
        if t["total"] is not None:
            t["completed"] = min(t["completed"], t["total"])
        self._changed(task_id)

    def update(self, task_id: int, *, description: str | None = None, total: int | None = None,
               completed: int | None = None, advance: int | None = None, **kw) -> None:
        t = self.tasks.get(task_id)
        if t is None:
            return
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        if t["total"] is not None:
            t["completed"] = min(t["completed"], t["total"])
        if description is not None and description != t["description"]:
            t["description"] = description
            self._line(task_id)  # a new stage: always shown
        else:
            self._changed(task_id)

    def remove_task(self, task_id: int) -> None:
        t = self.tasks.pop(task_id, None)
        if t is not None and t["shown"] != t["completed"]:
            self.tasks[task_id] = t
            self._line(task_id)
            self.tasks.pop(task_id)

    def log(self, *args, **kw) -> None:
        self.write(" ".join(str(a) for a in args))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


@contextlib.contextmanager
def bar(progress, description: str, total: int):
    """A rich progress task for the duration of a `with` block; yields advance(n=1)."""
    tid = progress.add_task(description, total=total)
    try:
        yield lambda n=1: progress.advance(tid, n)
    finally:
        progress.remove_task(tid)
