"""Reading ahead: the inputs of the next units read (and, on a GPU, moved to the device)
on a background thread while the current unit computes (../shared/DESIGN.md, "The
executor as units": reads overlapped with compute).

The local scheduler hands the stager its units in the order it will run them
(`ahead`); a staging thread reads each unit's input tensors from the mapped files and
makes them private float32-ready buffers on the run's device, as many units ahead as
fit in a byte budget. The runner's loads take them (`take`); a unit's leftovers (inputs
read another way: file copies, tiles) are dropped when it finishes (`finish`).

- On a GPU each tensor is copied from the mapped file into pinned host memory (the
  disk read and the page faults happen on the staging thread), then to the device on a
  transfer stream of its own, without blocking; the compute stream waits for that copy's
  event before the first use. Pinned blocks come from torch's caching host allocator,
  which reuses a block only after the copies that read it have finished.
- On the CPU the staging thread makes the float32 copy itself. A merge on the CPU is
  mostly bound by memory bandwidth, which the staging thread would share, so it runs
  only when asked (`FUSIONLANG_STAGE_AHEAD=1`: cold reads of models larger than the page
  cache, and the tests of this module, which check it against the direct path).

Staging changes where bytes are read, never what is computed: the values are those of
`TensorReader.load`. A read error is raised where the runner takes the tensor, so it
is located as a direct read's would be.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass

import torch

from ..plan.graph import shape_numel
from .reader import TORCH_DTYPES, TensorReader, available_memory

Key = tuple[str, str, "tuple[int, int] | None"]  # (source key, tensor name, row block)

# The staged bytes held at once (admitted whole units; one unit is always admitted):
# this share of the device's free memory, and at most MAX_STAGED_BYTES.
STAGED_SHARE = 0.25
MAX_STAGED_BYTES = 4 << 30


@dataclass
class _Entry:
    unit: int
    value: torch.Tensor | None = None
    event: object = None  # the transfer's CUDA event
    error: BaseException | None = None


def stage_ahead(device: torch.device) -> bool:
    """Whether a run on `device` reads ahead: on a CUDA GPU unless FUSIONLANG_STAGE_AHEAD=0,
    on the CPU only with FUSIONLANG_STAGE_AHEAD=1 (module docstring), never on MPS."""
    flag = os.environ.get("FUSIONLANG_STAGE_AHEAD")
    return flag == "1" if device.type == "cpu" else device.type == "cuda" and flag != "0"


def staging_budget(device: torch.device) -> int:
    """Bytes of staged inputs held at once on `device` (module constants): a quarter of
    the device's free memory on a GPU, of the available host memory on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_memory()
    return int(min(MAX_STAGED_BYTES, STAGED_SHARE * free)) if free else MAX_STAGED_BYTES // 16


class Stager:
    """Stages the input tensors of queued units on a background thread, in queue order,
    holding at most `budget` bytes of units not finished (a unit is admitted whole and
    counted until it finishes, taken or not, so what is staged ahead and the current
    unit's inputs stay within the budget; one unit is always admitted). Units finish in
    the order they were queued. `taken` counts the tensors handed out, `peak` the most
    bytes held; `close()` stops the thread. A device out of memory while staging, or a
    staging thread that failed, leaves the tensors to be read directly."""

    def __init__(self, reader: TensorReader, device: torch.device, budget: int):
        self.reader = reader
        self.device = device
        self.budget = budget
        self.taken = self.peak = 0
        self._cv = threading.Condition()
        self._queue: deque[tuple[int, list[Key], int]] = deque()  # (unit, its loads, their staged bytes)
        self._ready: dict[Key, deque[_Entry]] = {}
        self._pending: dict[Key, int] = {}  # queued or in flight, not yet ready
        self._finished = -1  # units up to this number have finished: their entries are not kept
        self._held = 0
        self._unit_bytes: dict[int, int] = {}  # admitted units not finished: their staged bytes
        self._closed = False
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._work, daemon=True, name="fusionlang-staging")
        self._thread.start()

    def ahead(self, unit: int, loads: list[Key]) -> None:
        """Queue unit number `unit` (unique per run) with its input tensors `loads`, after
        the units queued before it (the order the scheduler runs them in)."""
        size = sum(self._nbytes(k) for k in loads)
        with self._cv:
            self._queue.append((unit, list(loads), size))
            for k in loads:
                self._pending[k] = self._pending.get(k, 0) + 1
            self._cv.notify_all()

    def take(self, key: Key) -> torch.Tensor | None:
        """The staged tensor `key` as a private float32 buffer on the device, waiting for
        it when it is queued; None when it is neither staged nor queued (the caller reads
        it directly). Raises what reading it raised (RunError E011)."""
        with self._cv:
            while not self._ready.get(key):
                if not self._pending.get(key) or self._closed:
                    return None
                self._cv.wait()
            entry = self._ready[key].popleft()
        if entry.error is not None:
            raise entry.error
        if entry.value is None:
            return None  # the device had no room for it ahead: read directly
        self.taken += 1
        value = entry.value
        if entry.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.event)
            value.record_stream(current)  # allocated on the transfer stream, used and freed on this one
        # NOTE: as TensorReader.load: a private float32 buffer (a fresh device copy already is one)
        return value if value.dtype == torch.float32 else value.float()

    def finish(self, unit: int) -> None:
        """Unit `unit` (and every unit queued before it) has finished: drop its entries not
        taken, and its queue place if it was not staged yet."""
        with self._cv:
            self._finished = unit
            for u in [u for u in self._unit_bytes if u <= unit]:
                self._held -= self._unit_bytes.pop(u)
            for k, entries in list(self._ready.items()):
                keep = deque(e for e in entries if e.unit > unit)
                if keep:
                    self._ready[k] = keep
                else:
                    del self._ready[k]
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the staging thread (after the tensor it is reading) and drop every entry."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._ready.clear()
            self._cv.notify_all()
        self._thread.join()

    # -- the staging thread
    def _work(self) -> None:
        try:
            self._stage_units()
        except BaseException:  # noqa: BLE001 (a failed stager stops staging: the runner reads directly)
            with self._cv:
                self._closed = True
                self._cv.notify_all()

    def _stage_units(self) -> None:
        torch.set_num_threads(1)  # NOTE: a conversion on this thread must not take the compute's cores
        while True:
            with self._cv:
                while not self._closed and not self._admissible():
                    self._cv.wait()
                if self._closed:
                    return
                unit, loads, size = self._queue.popleft()
                if unit <= self._finished:
                    self._forget(loads)
                    continue
                self._unit_bytes[unit] = size
                self._held += size
                self.peak = max(self.peak, self._held)
            for k in loads:
                entry = _Entry(unit)
                if unit > self._finished and not self._closed:
                    try:
                        entry.value, entry.event = self._read(k)
                    except torch.cuda.OutOfMemoryError:
                        pass  # NOTE: no room ahead: the runner reads it when it needs it
                    except Exception as e:  # noqa: BLE001 (raised where the runner takes it)
                        entry.error = e
                with self._cv:
                    self._pending[k] -= 1
                    if unit > self._finished and not self._closed:
                        self._ready.setdefault(k, deque()).append(entry)
                    self._cv.notify_all()

    def _admissible(self) -> bool:
        """The next queued unit may be staged now (the caller holds the lock)."""
        if not self._queue:
            return False
        unit, _, size = self._queue[0]
        return unit <= self._finished or self._held == 0 or self._held + size <= self.budget

    def _forget(self, loads: list[Key]) -> None:
        """A dropped unit's loads are no longer pending (the caller holds the lock)."""
        for k in loads:
            self._pending[k] -= 1
        self._cv.notify_all()

    def _nbytes(self, key: Key) -> int:
        """The staged size of `key` (the device copy in its stored dtype, or its float32
        copy on the CPU), from the plan's header data; 0 when unknown."""
        source, tensor, rows = key
        try:
            dtype, shape, _ = self.reader.plan.sources[source].tensors[tensor]
        except KeyError:
            return 0
        numel = shape_numel(shape)
        if rows is not None and shape and shape[0]:
            numel = numel // shape[0] * (rows[1] - rows[0])
        stored = TORCH_DTYPES.get(dtype)
        return numel * (4 if self.device.type == "cpu" or stored is None else stored.itemsize)

    def _read(self, key: Key) -> tuple[torch.Tensor, object]:
        """Read `key`: on a GPU into pinned memory, then to the device on the transfer
        stream (returns the device tensor, in its stored dtype, and the copy's event);
        on the CPU as `TensorReader.load` (no event)."""
        if self._stream is None:
            return self.reader.load_direct(*key), None
        view = self.reader.view(*key)
        host = torch.empty(view.shape, dtype=view.dtype, pin_memory=True)
        host.copy_(view)  # NOTE: the disk read and page faults happen here, on this thread
        with torch.cuda.stream(self._stream):
            value = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return value, event
