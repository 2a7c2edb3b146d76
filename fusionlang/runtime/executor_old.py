"""The streaming executor: an interpreter over the scheduled plan.

Phase by phase, tensor group by tensor group: read each input tensor lazily from
safetensors (mmap), compute on the chosen device in float32, free every value after
its last use, and write each output tensor straight to its final offset in a
pre-laid-out safetensors shard. Outputs go to a temporary directory that is renamed
into place at the end, so a failed or interrupted run never leaves an output that
looks complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .ops import OPS, sparsify
from .plan.graph import OutputSpec, Plan
from .sources import DTYPE_SIZES

# safetensors dtype name -> torch dtype: what is loaded, and what a cast writes (integer
# and bool buffers, e.g. position_ids, pass through merges unchanged)
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
                   "preprocessor_config.json", "chat_template.jinja",
                   # sentence-transformers: the module list and the pooling/normalize modules
                   "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
DEFAULT_SHARD_BYTES = 4 * 1024**3


_LIBC = None


def _trim_heap() -> None:
    """Give free heap pages back to the OS (after a group of odd-sized whole tensors,
    whose freed blocks would otherwise fragment the heap and pile up)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _keep_freed_memory() -> None:
    """Let glibc reuse freed tensor memory instead of returning it to the OS.

    NOTE: every tensor group allocates and frees buffers of the same sizes; with glibc's
    defaults each large buffer is a fresh mmap, paid for again in page faults and kernel
    zeroing on every tensor. Raising the mmap and trim thresholds keeps freed blocks in
    the heap, so steady-state memory is one group's worth, reused.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("FUSIONLANG_MALLOC") == "default":
        return
    try:
        global _LIBC
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # bigger (whole embedding) buffers: mmap, freed at once
        libc.mallopt(m_trim_threshold, 1 << 30)
        _LIBC = libc
    except (OSError, AttributeError):
        pass


class _MappedFile:
    """A safetensors file mapped read-only; tensors are zero-copy views of the mapping
    (file-backed page cache, not anonymous memory)."""

    def __init__(self, path: str):
        import mmap
        import struct
        import warnings

        self.path = path
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self.mm[:8])
        self.header = json.loads(self.mm[8:8 + n])
        self.start = 8 + n
        self._warnings = warnings

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = TORCH_DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        if a == b:
            return torch.empty(info["shape"], dtype=dtype)
        with self._warnings.catch_warnings():
            # NOTE: torch warns that a view of a read-only buffer is writable; the
            # executor never writes into a loaded view (it converts or copies first).
            self._warnings.simplefilter("ignore")
            t = torch.frombuffer(self.mm, dtype=dtype, count=(b - a) // dtype.itemsize, offset=self.start + a)
        return t.view(info["shape"])


class RunError(Exception):
    """A user-facing failure while running (unreadable input, unwritable output...);
    `at` locates it in the spec (file, line, column[, end line, end column]) when known (a save, a source call)."""

    def __init__(self, message: str, hint: str = "", code: str = "E011", at: tuple | None = None):
        super().__init__(message)
        self.message, self.hint, self.code, self.at = message, hint, code, at


class _BadValue(Exception):
    """An output value that is not finite (raised where the cast is computed, turned into
    a located RunError by the executor)."""

    def __init__(self, node: str, value: torch.Tensor, source: torch.Tensor):
        super().__init__(node)
        self.node, self.value, self.source = node, value, source


def _check_cast(node: str, value: torch.Tensor, source: torch.Tensor) -> None:
    """Raise _BadValue when the cast `value` of the float32 `source` is not all finite.

    NOTE: a float32 sum is NaN or inf when any entry is (or, rarely, when finite values
    add up past float32's range: then the exact check decides); it costs a twentieth of
    `isfinite(...).all()`, which allocates a bool per entry."""
    if not value.is_floating_point():
        return
    v = value.float() if value.itemsize == 1 else value  # fp8: no isfinite or sum
    if not math.isfinite(v.sum(dtype=torch.float32).item()) and not bool(torch.isfinite(v).all()):
        raise _BadValue(node, value, source)
    # NOTE: float8_e4m3fn has no inf and torch saturates to ±448: |x| >= 464 (which would round past 448) overflows
    if value.dtype == torch.float8_e4m3fn and bool((source.abs() >= 464).any()):
        raise _BadValue(node, value, source)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was requested but CUDA is not available", "use --device auto or cpu", "E006")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RunError("--device mps was requested but MPS is not available", "use --device auto or cpu", "E006")
    return torch.device(name)


class WriteQueue:
    """Output bytes are written on one background thread, so that the kernel's copy of one
    tensor into the page cache overlaps the computation of the next (pwrite releases the
    GIL; all computation stays on the calling thread). At most `max_pending` bytes wait;
    a failed write is raised (as a RunError) at the next call."""

    def __init__(self, max_pending: int = 128 << 20):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fusionlang-write")
        self.pending: deque = deque()  # (future, bytes, path)
        self.bytes = 0
        self.max_pending = max_pending

    def submit(self, fn: Callable[[], None], nbytes: int, path: Path) -> None:
        while self.pending and self.bytes + nbytes > self.max_pending:
            self._wait_oldest()
        self.pending.append((self.pool.submit(fn), nbytes, path))
        self.bytes += nbytes

    def _wait_oldest(self) -> None:
        future, nbytes, path = self.pending.popleft()
        self.bytes -= nbytes
        self.run_now(future.result, path)

    @staticmethod
    def run_now(fn: Callable[[], None], path: Path) -> None:
        """Write on the calling thread (or wait for a queued write); errors are E016."""
        try:
            fn()
        except OSError as e:
            raise RunError(f"cannot write '{path}': {e.strerror or e}",
                           "free disk space or choose another output directory", "E016") from None

    def drain(self) -> None:
        while self.pending:
            self._wait_oldest()

    def close(self) -> None:
        """Stop: pending writes are cancelled or finished, errors ignored (the caller is
        already failing or has drained)."""
        for future, _, _ in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


class ShardWriter:
    """Lays out an output's shards up front (shapes are known from headers), then writes
    each tensor's bytes at its offset as soon as it is computed: memory stays at one group."""

    def __init__(self, out: OutputSpec, directory: Path, shard_bytes: int, queue: WriteQueue):
        self.dir = directory
        self.queue = queue
        self.where: dict[str, tuple[int, int, int]] = {}  # tensor -> (shard, offset, nbytes)
        shards: list[list[str]] = [[]]
        size = 0
        for t in out.tensors:
            n = _nbytes(out.dtypes[t], out.shapes[t])
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += n
        total = len(shards)
        self.names = ["model.safetensors"] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.fds: list[int] = []
        weight_map = {}
        for si, tensors in enumerate(shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            off = 0
            for t in tensors:
                n = _nbytes(out.dtypes[t], out.shapes[t])
                header[t] = {"dtype": out.dtypes[t], "shape": list(out.shapes[t]), "data_offsets": [off, off + n]}
                off += n
                weight_map[t] = self.names[si]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(self.dir / self.names[si], os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            base = 8 + len(raw)
            os.ftruncate(fd, base + off)
            self.fds.append(fd)
            for t in tensors:
                start, end = header[t]["data_offsets"]
                self.where[t] = (si, base + start, end - start)
        if total > 1:
            total_size = sum(_nbytes(out.dtypes[t], out.shapes[t]) for t in out.tensors)
            (self.dir / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))

    def write(self, tensor: str, value: torch.Tensor, first_row: int = 0, owned: bool = False) -> int:
        """Write a whole tensor, or a block of its rows starting at `first_row`. Only a
        value the caller hands over (`owned`: nothing will write into its memory again)
        is written in the background; any other is written before this returns."""
        si, off, n = self.where[tensor]
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if first_row:
            off += first_row * (data.nbytes // value.shape[0])
        assert data.nbytes <= n, f"{tensor}: {data.nbytes} bytes, header says {n}"
        # NOTE: `data` (a view of the tensor) keeps the tensor alive until it is written
        write_all = functools.partial(_pwrite_all, self.fds[si], data, off)
        if owned:
            self.queue.submit(write_all, data.nbytes, self.dir / self.names[si])
        else:
            # NOTE: e.g. a cast to the dtype a value already has returns that value, and a
            # later op may update it in place: it must be written now.
            self.queue.run_now(write_all, self.dir / self.names[si])
        return data.nbytes

    def close(self) -> None:
        """Close the shard files (after the queue is drained or stopped)."""
        # NOTE: no fsync: atomicity against interruption comes from the rename of the
        # finished directory; durability across power loss is the filesystem's job.
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _pwrite_all(fd: int, data, off: int) -> None:
    view = memoryview(data)
    while len(view):
        written = os.pwrite(fd, view, off)
        view, off = view[written:], off + written


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(dtype: str, shape) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


@dataclass
class RunStats:
    tensors_written: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)


class Executor:
    def __init__(self, plan: Plan, device: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Callable[[int, int], None] | None = None):
        self.plan = plan
        self.device = pick_device(device)
        self.shard_bytes = shard_bytes
        self.progress = progress
        self._files: dict[str, object] = {}
        self.stats = RunStats()

    # -- inputs
    def _load(self, source: str, tensor: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._load_view(source, tensor, rows)
        # NOTE: the conversion (or copy, for fp32) makes a private buffer that ops may
        # reuse in place; the mapped view itself is never written. Integer and bool
        # buffers are computed in float32 too (exact below 2**24) and cast back on output.
        if t.dtype != torch.float32:
            return t.to(self.device).float() if self.device.type != "cpu" else t.float()
        return t.to(self.device, copy=True)

    def _load_view(self, source: str, tensor: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The stored tensor (or a block of its rows) as a read-only view of the mapped file."""
        src = self.plan.sources[source]
        _, _, file = src.tensors[tensor]
        h = self._files.get(file)
        if h is None:
            try:
                h = _MappedFile(file)
            except (OSError, ValueError, json.JSONDecodeError) as e:
                raise RunError(f"cannot read '{file}': {e}", "the model file changed or is corrupt; re-run compile") from None
            self._files[file] = h
        try:
            t = h.tensor(tensor)
        except (KeyError, ValueError, RuntimeError) as e:
            raise RunError(f"cannot read tensor '{tensor}' from '{file}': {e}",
                           "the file is corrupt or changed since compile; re-run compile") from None
        if rows is not None:
            t = t[rows[0]:rows[1]]
        self.stats.bytes_read += t.numel() * t.element_size()
        return t

    # -- ops
    def _apply(self, nid: str, args: list[torch.Tensor], donate: bool) -> torch.Tensor:
        n = self.plan.nodes[nid]
        if n.op == "load":
            return self._load(n.param("source"), n.param("tensor"), n.param("rows"))
        if n.op == "cast":
            value = args[0].to(TORCH_DTYPES[n.param("dtype")])
            _check_cast(nid, value, args[0])
            return value
        o = OPS[n.op]
        n_single = sum(1 for p in o.params if p.type == "tensor")
        kwargs = _op_kwargs(n)
        # Inputs are stored flat, in parameter order; a list parameter takes the rest.
        call_args: list = []
        rest = list(args)
        for p in o.params:
            if p.type == "tensor":
                call_args.append(rest.pop(0))
            elif p.type == "tensors":
                k = len(args) - n_single
                call_args.append(rest[:k])
                rest = rest[k:]
        if o.inplace:
            kwargs["_inplace"] = donate
        return o.fn(*call_args, **kwargs)

    def _refcounts(self, nodes: list[str], inside: set[str]) -> dict[str, int]:
        rc: dict[str, int] = {}
        for nid in nodes:
            for i in self.plan.nodes[nid].inputs:
                if i in inside:
                    rc[i] = rc.get(i, 0) + 1
        return rc

    def run(self) -> RunStats:
        """Execute the plan; writes every output atomically. Raises RunError."""
        import gc

        # NOTE: the tile loop allocates many short-lived containers and makes no reference
        # cycles worth collecting; the cyclic collector took ~3% of a DARE run's py-spy samples.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if was_enabled:
                gc.enable()

    def _run(self) -> RunStats:
        t0 = time.perf_counter()
        _CREATED_DIRS.clear()
        _keep_freed_memory()
        plan = self.plan
        order = plan.order or plan.topo_order()
        pos = {nid: i for i, nid in enumerate(order)}
        ph = plan.phase_of or {nid: 0 for nid in order}
        reduces = [nid for nid in order if OPS.get(plan.nodes[nid].op) is not None and OPS[plan.nodes[nid].op].kind == "reduce"]
        roots: dict[str, list[tuple[str, str, int]]] = {}  # root node -> [(output, tensor, first row)]
        for okey, o in plan.outputs.items():
            for t in o.tensors:
                for first_row, nid in o.parts(t):
                    roots.setdefault(nid, []).append((okey, t, first_row))
        self._roots = roots
        self._group_nodes: list[str] = []
        n_phases = max(ph.values(), default=0) + 1
        reduce_values: dict[str, torch.Tensor] = {}
        tmp_dirs: dict[str, Path] = {}
        writers: dict[str, ShardWriter] = {}
        out_dirs = prepare_outputs(plan)  # output key -> the directory to replace (symlinks resolved)
        queue = WriteQueue()
        try:
            for okey, o in plan.outputs.items():
                tmp_dirs[okey] = _make_tmp(out_dirs[okey], o)
                writers[okey] = ShardWriter(o, tmp_dirs[okey], self.shard_bytes, queue)
            total = sum(len(v) for v in roots.values())
            done = 0
            # Values one group computes for others (a per-tensor statistic shared by the row
            # blocks of a split tensor) are kept in `shared` for the rest of the phase.
            exports = {i for nid, n in plan.nodes.items() for i in n.inputs
                       if plan.nodes[i].group and plan.nodes[i].group != n.group and nid not in reduces}
            group_deps: dict[str, set[str]] = {}
            for n in plan.nodes.values():
                for i in n.inputs:
                    if i in exports:
                        group_deps.setdefault(n.group, set()).add(plan.nodes[i].group)
            for p in range(n_phases):
                shared: dict[str, torch.Tensor] = {}
                targets = [nid for nid in roots if ph[nid] == p]
                targets += [nid for nid in exports if ph[nid] == p]
                targets += [i for r in reduces if ph[r] == p for i in plan.nodes[r].inputs if i not in reduce_values]
                by_group: dict[str, list[str]] = {}
                for t in targets:
                    by_group.setdefault(plan.nodes[t].group, []).append(t)
                groups = _order_groups(sorted(by_group, key=lambda g: min(pos[t] for t in by_group[g])), group_deps)
                stat_inputs: dict[str, torch.Tensor] = {}
                for g in groups:
                    need = self._closure(by_group[g], {**reduce_values, **shared})
                    nodes = sorted(need, key=pos.__getitem__)
                    self._group_nodes = nodes
                    rc = self._refcounts(nodes, need)
                    keep = set(by_group[g])
                    tiled = self._tileable(nodes, by_group[g], roots, ph, p, shared, reduce_values)
                    if tiled:
                        for nid, value in self._run_tiled(nodes, by_group[g], tiled, shared, reduce_values):
                            if nid in exports:
                                shared[nid] = value
                            elif nid not in roots:
                                stat_inputs[nid] = value
                            for oname, t, first_row in roots.get(nid, ()):
                                # a tile output buffer: nothing writes into it after its stage
                                self.stats.bytes_written += writers[oname].write(t, value, first_row, owned=True)
                                done += 1
                                if self.progress:
                                    self.progress(done, total)
                        continue
                    vals: dict[str, torch.Tensor] = {}
                    for nid in nodes:
                        n = plan.nodes[nid]
                        args = [vals[i] if i in vals else shared[i] if i in shared else reduce_values[i] for i in n.inputs]
                        first = n.inputs[0] if n.inputs else None
                        donate = first is not None and first in vals and rc.get(first, 0) == 1 and first not in keep \
                            and n.inputs.count(first) == 1
                        vals[nid] = self._apply(nid, args, donate)
                        for i in n.inputs:
                            if i in rc:
                                rc[i] -= 1
                                if rc[i] == 0 and i not in keep:
                                    vals.pop(i, None)
                        if nid in roots and ph[nid] == p:
                            for oname, t, first_row in roots[nid]:
                                self.stats.bytes_written += writers[oname].write(t, vals[nid], first_row)
                                done += 1
                                if self.progress:
                                    self.progress(done, total)
                    for t in by_group[g]:
                        if t in exports:
                            shared[t] = vals[t]
                        elif t not in roots:
                            stat_inputs[t] = vals[t]
                    vals.clear()
                    if "@" not in g and any(plan.nodes[n].shape and _numel(plan.nodes[n].shape) > (1 << 22) for n in nodes):
                        _trim_heap()
                for r in reduces:
                    if ph[r] == p:
                        args = [stat_inputs[i] if i in stat_inputs else reduce_values[i] for i in plan.nodes[r].inputs]
                        reduce_values[r] = self._apply(r, args, False)
            queue.drain()
            queue.close()
            for okey, o in plan.outputs.items():
                writers[okey].close()
                self._finish(o, tmp_dirs[okey])
            _commit_all([(tmp_dirs[k], Path(out_dirs[k]), o) for k, o in plan.outputs.items()])
            for okey, o in plan.outputs.items():
                self.stats.outputs[okey] = o.path
            self.stats.tensors_written = sum(len(o.tensors) for o in plan.outputs.values())
        except _BadValue as e:
            self._cleanup(queue, writers, tmp_dirs)
            raise self._value_error(e) from None
        except (RunError, KeyboardInterrupt, SystemExit):
            self._cleanup(queue, writers, tmp_dirs)
            raise
        except Exception:
            # NOTE: an op may fail on NaN inputs (e.g. a top-k that cannot find its
            # threshold): report the non-finite input rather than the op's failure
            self._cleanup(queue, writers, tmp_dirs)
            bad_input = self._nonfinite_input(self._group_nodes)
            if bad_input is not None:
                raise bad_input from None
            raise
        except BaseException:
            self._cleanup(queue, writers, tmp_dirs)
            raise
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    @staticmethod
    def _cleanup(queue: WriteQueue, writers: dict, tmp_dirs: dict) -> None:
        """After a failure: stop writing, remove every temporary output and the parent
        directories this run created."""
        queue.close()
        for w in writers.values():
            for fd in w.fds:
                os.close(fd)
            w.fds = []
        for d in tmp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        for d in _CREATED_DIRS:  # parents this run created, deepest first
            try:
                d.rmdir()
            except OSError:
                pass

    def _nonfinite_input(self, nodes, o: OutputSpec | None = None) -> RunError | None:
        """E031 at the source call of the first input tensor read by `nodes` that holds
        NaN or inf, or None when they are all finite (a check made only after a failure:
        inputs are not scanned on the normal path)."""
        plan = self.plan
        for nid in sorted(nodes):
            n = plan.nodes[nid]
            if n.op != "load":
                continue
            try:
                view = self._load_view(n.param("source"), n.param("tensor"), n.param("rows"))
            except RunError:
                continue
            if view.is_floating_point() and not bool(torch.isfinite(view := view.float() if view.itemsize == 1 else view).all()):
                bad = int((~torch.isfinite(view)).sum())
                src = plan.sources[n.param("source")]
                reads = f", which output '{o.name}' reads" if o is not None else ""
                return RunError(f"input model '{src.key}' has {bad} non-finite value{'s' * (bad != 1)} (NaN or inf) "
                                f"in tensor '{n.param('tensor')}'{reads}",
                                "repair or replace that model; a merge of non-finite weights is not a model", "E031",
                                src.at or (o.at if o is not None else None))
        return None

    def _value_error(self, e: _BadValue) -> RunError:
        """The located error for a non-finite output value: E031 at the source call of
        an input model that holds non-finite values where the output reads them, else
        E030 at the save when the cast overflowed (finite values beyond the dtype's
        range), else E031 at the save (the merge itself computed them)."""
        plan = self.plan
        okey, tensor, _ = self._roots[e.node][0]
        o = plan.outputs[okey]
        bad_input = self._nonfinite_input(self._closure([e.node], {}), o)
        if bad_input is not None:
            return bad_input
        src = e.source
        if bool(torch.isfinite(src).all()):
            dtype = o.dtypes.get(tensor, "")
            top = float(src.abs().max())
            limit = torch.finfo(e.value.dtype).max
            return RunError(f"tensor '{tensor}' of output '{o.name}' does not fit in {dtype}: max |value| {top:.6g} "
                            f"> {limit:.6g}, the largest finite {dtype} value", "save it in a wider dtype "
                            "(e.g. `as fp32` or `as bf16`), or change the merge so its values stay in range", "E030", o.at)
        return RunError(f"tensor '{tensor}' of output '{o.name}' has non-finite values (NaN or inf) although its "
                        "inputs are finite", "check the merge's arguments (e.g. weights that cancel out, or a huge scale)",
                        "E031", o.at)

    # -- tiled execution of pointwise groups
    def _tileable(self, nodes: list[str], targets: list[str], roots: dict, ph: dict, p: int,
                  shared: dict, reduce_values: dict) -> int:
        """The element count of a group that can run in cache-sized tiles, else 0.

        A group qualifies when all its tensors have the same element count and every
        node is pointwise (the value at flat position i depends only on the inputs at
        position i, and on small per-tensor values from outside the group) or a tile
        statistic (a per-tensor value summed tile by tile, e.g. DARE's L1 factor). It
        must compute only output tensors of this phase (all casts) and statistics.

        NOTE: other per-tensor statistics (a top-k threshold) need their input whole;
        such groups run untiled, where each task vector is freed after its statistic.
        (Gathering them from tiles held every model's task vector at once: TIES with 4
        experts went from 0.6 to 1.0 GB anonymous.)
        """
        # NOTE: FUSIONLANG_NO_TILE=1 turns tiling off (A/B timing, debugging); results are the same.
        if self.device.type != "cpu" or os.environ.get("FUSIONLANG_NO_TILE"):
            return 0
        plan = self.plan
        numel = 0
        has_stats = False
        for nid in nodes:
            n = plan.nodes[nid]
            if n.op == "const":
                continue
            if n.op not in TILE_OPS:
                if not _is_tile_stat(n.op):
                    return 0
                has_stats = True
                continue  # a small value, computed from tensors of the group (checked as its nodes)
            if n.shape is None:
                return 0
            k = _numel(n.shape)
            if numel and k != numel:
                return 0
            numel = k
            for i in n.inputs:
                if i in shared or i in reduce_values:
                    v = shared[i] if i in shared else reduce_values[i]
                    if v.numel() > 16:
                        return 0
        if numel <= _TILE or (has_stats and _TILE % sparsify.STAT_CHUNK):
            return 0
        if any(plan.nodes[i].op == "cast" for i in rc_inputs(plan, nodes)):
            return 0  # a cast consumed inside the group (tiles write casts straight to the output)
        for t in targets:
            if _is_tile_stat(plan.nodes[t].op):
                continue
            if t not in roots or ph[t] != p or plan.nodes[t].op != "cast":
                return 0
        return numel

    def _run_tiled(self, nodes: list[str], targets: list[str], numel: int, shared: dict, reduce_values: dict):
        """Run a tileable group tile by tile: every node on flat positions [s, s + _TILE),
        then the next tile, so the intermediate values of a tile stay in the CPU cache
        instead of streaming whole tensors through memory once per op. Yields
        (target node, whole value) at the end.

        A group with tile statistics runs in stages: stage 0 sums the statistics over
        the tiles, stage 1 recomputes the tile values it needs (cheap: the inputs are
        cached) and uses them, and so on.

        NOTE: pointwise ops give the same bits on a tile as on the whole tensor; ops that
        draw or select by flat position (DARE masks, top-k tie cuts) get the tile's
        offset, as row blocks do, and tile statistics sum the same fixed chunks.
        """
        plan = self.plan
        barriers = {nid for nid in nodes if _is_tile_stat(plan.nodes[nid].op)}
        stage: dict[str, int] = {}
        for nid in nodes:  # nodes are in plan order: inputs first
            stage[nid] = max((stage[i] + (i in barriers) for i in plan.nodes[nid].inputs if i in stage), default=0)
        outside = {**reduce_values, **shared}
        outs: dict[str, torch.Tensor] = {}
        for k in range(max(stage.values(), default=0) + 1):
            wanted = [t for t in nodes if stage[t] == k and (t in barriers or t in targets)]
            need = self._closure(wanted, outside)  # finished statistics are inputs now
            self._tile_stage([nid for nid in nodes if nid in need], numel, outside, outs)
        for nid in targets:
            yield nid, (outs[nid].view(plan.nodes[nid].shape) if nid in outs else outside[nid])

    def _tile_stage(self, nodes: list[str], numel: int, outside: dict, outs: dict) -> None:
        """One pass over the tiles of `nodes`: casts are written into `outs` (whole
        buffers); tile statistics are computed into `outside`."""
        plan = self.plan
        rc = self._refcounts(nodes, set(nodes))
        prog = []
        partials: dict[str, list] = {}
        for nid in nodes:
            n = plan.nodes[nid]
            if n.op == "const":
                outside[nid] = self._apply(nid, [], False)
            elif n.op == "load":
                view = self._load_view(n.param("source"), n.param("tensor"), n.param("rows")).reshape(-1)
                convert = view.dtype != torch.float32  # as _load: every input is computed in float32
                prog.append((nid, _LOAD, view.split(_TILE), convert, None, None))
            elif n.op == "cast":
                outs[nid] = torch.empty(numel, dtype=TORCH_DTYPES[n.param("dtype")])
                prog.append((nid, _CAST, outs[nid].split(_TILE), n.inputs[0], None, None))
            elif _is_tile_stat(n.op):
                partials[nid] = []
                prog.append((nid, _STAT, OPS[n.op].tile_stat[0], n.inputs, _op_kwargs(n), partials[nid]))
            else:
                o = OPS[n.op]
                kwargs = _op_kwargs(n)
                offset0 = kwargs.pop("offset", 0) if n.op in OFFSET_OPS else None
                listy = any(q.type == "tensors" for q in o.params)
                first = n.inputs[0] if n.inputs else None
                can_donate = o.inplace and first is not None and first not in outside \
                    and n.inputs.count(first) == 1 and not listy
                prog.append((nid, _OP, o.fn, n.inputs, kwargs, (offset0, listy, can_donate)))
        # NOTE: loads and casts are pre-split into tile views (one C call instead of a
        # slice per tile and op: the per-op Python overhead is what tiles pay for).
        for j, s in enumerate(range(0, numel, _TILE)):
            vals: dict[str, torch.Tensor] = {}
            left = dict(rc)
            for nid, kind, a, b, kwargs, extra in prog:
                if kind is _LOAD:
                    vals[nid] = a[j].float() if b else a[j].clone()
                    continue
                if kind is _CAST:
                    a[j].copy_(vals[b])
                    _check_cast(nid, a[j], vals[b])
                    ins = (b,)
                elif kind is _STAT:
                    ins = b
                    extra.append(a(*[vals[i] if i in vals else outside[i] for i in ins], offset=s, **kwargs))
                else:
                    ins = b
                    offset0, listy, can_donate = extra
                    args = [vals[i] if i in vals else outside[i] for i in ins]
                    kw = kwargs
                    if offset0 is not None or can_donate:
                        kw = dict(kwargs)
                        if offset0 is not None:
                            kw["offset"] = offset0 + s
                        if can_donate:
                            kw["_inplace"] = left.get(ins[0], 0) == 1
                    vals[nid] = a(args, **kw) if listy else a(*args, **kw)
                for i in ins:
                    c = left.get(i)
                    if c is not None:
                        left[i] = c - 1
                        if c == 1:
                            vals.pop(i, None)
        for nid, parts in partials.items():
            outside[nid] = OPS[plan.nodes[nid].op].tile_stat[1](parts, **_op_kwargs(plan.nodes[nid]))

    def _closure(self, targets: list[str], known: dict) -> set[str]:
        """The nodes `targets` need, stopping at values already `known`."""
        need: set[str] = set()
        stack = list(targets)
        while stack:
            nid = stack.pop()
            if nid in need or nid in known:
                continue
            need.add(nid)
            stack.extend(self.plan.nodes[nid].inputs)
        return need

    def _finish(self, o: OutputSpec, d: Path) -> None:
        src = self.plan.sources[o.reference]
        config = dict(src.config)
        config.update(o.config_overrides)
        if o.dtype:
            name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[o.dtype]
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = name
            if "torch_dtype" not in config and "dtype" not in config:
                config["torch_dtype"] = name
        if config:
            (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in _companion_files(Path(src.path), "auto_map" in config):
            shutil.copy2(Path(src.path) / f, d / f)
        for m in _sentence_transformer_modules(Path(src.path)):
            shutil.copytree(Path(src.path) / m, d / m)
        if (Path(src.path) / "additional_chat_templates").is_dir():
            shutil.copytree(Path(src.path) / "additional_chat_templates", d / "additional_chat_templates")
        (d / "README.md").write_text(self._model_card(o, src, config))

    def _model_card(self, o: OutputSpec, src, config: dict) -> str:
        """The output's README.md: Hugging Face metadata (`base_model`: the hub ids of the
        inputs that have one, `library_name`, `tags` with `fusionlang`, which marks the
        directory as a fusionlang output) and the spec it was merged with."""
        bases = []
        for s in [src, *self.plan.sources.values()]:
            hub = _hub_id(s.path)
            if hub and hub not in bases:
                bases.append(hub)
        lib = "sentence-transformers" if (Path(src.path) / "modules.json").is_file() else "transformers"
        meta = ["---"]
        if bases:
            meta += ["base_model:", *(f"- {b}" for b in bases)]
        meta += [f"library_name: {lib}", "tags: [fusionlang, merge]", "---"]
        fence = "```"
        while fence in self.plan.spec_text:
            fence += "`"
        return ("\n".join(meta) + f"\n# {o.name}\n\nMerged with fusionlang from `{os.path.basename(self.plan.spec_file)}`:"
                f"\n\n{fence}fuse\n{self.plan.spec_text.rstrip()}\n{fence}\n")


_COMPANION = re.compile(r"^(tokenizer.*|vocab.*|merges\.txt|.*\.model|.*\.tiktoken|added_tokens\.json|"
                        r"special_tokens_map\.json|chat_template.*|bpe\.codes|.*\.spm|(generation|preprocessor|processor|"
                        r"video_preprocessor|feature_extractor|image_processor)_config\.json)$")


def _companion_files(model_dir: Path, custom_code: bool) -> list[str]:
    """The files next to a model's weights that travel with a merge of it: everything
    transformers' tokenizer / processor loading reads (TOKENIZER_FILES and the patterns
    of _COMPANION: `tokenizer.model`, `*.tiktoken`, `chat_template.jinja`, ...), the
    sentence-transformers configs, and with `custom_code` (an `auto_map` in config.json)
    the model's `.py` files."""
    try:
        names = sorted(os.listdir(model_dir))
    except OSError:
        return []
    out = []
    for f in names:
        if not (model_dir / f).is_file() or f.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json")):
            continue
        if f in TOKENIZER_FILES or _COMPANION.match(f) or (custom_code and f.endswith(".py")):
            out.append(f)
    return out


def _hub_id(path: str) -> str | None:
    """The Hugging Face hub id of a model directory in the hub cache
    (`models--org--name/snapshots/...`); None for a local model (its config's
    `_name_or_path` is often a local path and is not trusted)."""
    m = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", path.replace(os.sep, "/"))
    return f"{m[1]}/{m[2]}" if m else None


def _sentence_transformer_modules(model_dir: Path) -> list[str]:
    """Module directories (pooling, normalize, dense, ...) that a sentence-transformers
    modules.json lists next to the transformer weights; they hold no merged weights."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        paths = [m.get("path", "") for m in modules if isinstance(m, dict)]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    return [p for p in paths if p and "/" not in p and ".." not in p and (model_dir / p).is_dir()
            and not any((model_dir / p).glob("*.safetensors"))]


_CREATED_DIRS: list[Path] = []

# Tiled execution: elements per tile (fp32: 256 KiB per value, a few live at once fit
# in a core's L2 cache), the pointwise ops it runs, and those that take a flat offset.
_TILE = 1 << 16
TILE_OPS = {"load", "cast", "const", "sub", "add", "mul", "scale", "axpy", "lerp", "sum", "mean", "weighted",
            "trim_topk", "trim_at", "drop_rows", "disjoint_merge"}
OFFSET_OPS = {"trim_topk", "drop_rows"}
_LOAD, _CAST, _OP, _STAT = object(), object(), object(), object()


def _op_kwargs(n) -> dict:
    """A plan node's parameters as keyword arguments of its op (lists are stored as tuples)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in n.params}


def _is_tile_stat(op: str) -> bool:
    """A per-tensor statistic the tiled executor sums tile by tile (e.g. DARE's L1 factor)."""
    return OPS.get(op) is not None and OPS[op].tile_stat is not None


def rc_inputs(plan: Plan, nodes: list[str]) -> set[str]:
    """Every node some node of `nodes` takes as input."""
    return {i for nid in nodes for i in plan.nodes[nid].inputs}


def _order_groups(groups: list[str], deps: dict[str, set[str]]) -> list[str]:
    """Keep the given order, but run a group that exports a value before its consumers."""
    present, done, out = set(groups), set(), []

    def visit(g: str) -> None:
        if g in done:
            return
        done.add(g)
        for d in sorted(deps.get(g, ())):
            if d in present:
                visit(d)
        out.append(g)

    for g in groups:
        visit(g)
    return out


def prepare_outputs(plan: Plan) -> dict[str, str]:
    """Before any work: clean the leftovers of killed runs next to every output
    (`outputs.clean_leftovers`), then check the save-path rules (`outputs.check_paths`,
    for saved JSON plans too). Returns output key -> the real directory to replace.
    Raises RunError (E016, located at the save) when a rule is broken or a leftover
    cannot be restored."""
    from .outputs import check_paths, clean_leftovers, shown

    targets: dict[str, str] = {}
    for okey, o in plan.outputs.items():
        path = o.path.rstrip(os.sep) or os.sep
        real = path if os.path.islink(path) and not os.path.exists(path) else os.path.realpath(path)
        targets[okey] = real
        try:
            clean_leftovers(real)
        except OSError as e:
            raise RunError(f"cannot restore the previous output '{shown(real)}' left by a killed run: {e.strerror or e}",
                           "move its `.fusionlang-old-` folder back into place by hand", "E016", o.at) from None
    inputs = [(k, s.path, sorted({f for _, _, f in s.tensors.values() if f})) for k, s in plan.sources.items()]
    specs = [plan.spec_file] if plan.spec_file and os.path.isfile(plan.spec_file) else []
    outs = list(plan.outputs.values())
    problems = check_paths([(o.path, _where(o)) for o in outs], inputs, specs)
    if problems:
        p = problems[0]
        raise RunError(p.message, p.hint, "E016", outs[p.index].at)
    return targets


def _where(o: OutputSpec) -> str:
    return f"{o.at[0]}:{o.at[1]}:{o.at[2]}" if o.at else o.loc or o.path


def _make_tmp(path: str, o: OutputSpec | None = None) -> Path:
    """A fresh `.NAME.fusionlang-tmp-PID` directory next to `path` (its parents are
    created, and removed again if the run fails). Raises RunError (E016)."""
    target = Path(path)
    try:
        missing = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        _CREATED_DIRS.extend(sorted(missing, key=lambda p: -len(p.parts)))
        tmp = target.parent / f".{target.name}.fusionlang-tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise RunError(f"cannot write to '{path}': {e.strerror}", "choose an output directory you can write to",
                       "E016", o.at if o else None) from None
    return tmp


def _commit_all(outputs: list[tuple[Path, Path, OutputSpec]]) -> None:
    """Move every finished output (tmp dir, target, spec) into place, all or none: first
    every existing target is moved aside (`.NAME.fusionlang-old-PID`), then every temp
    dir is moved in, and the old ones are deleted only when all are in place. On any
    failure (or interruption) everything moved so far is moved back and RunError (E016,
    located at the save that failed) is raised; the temp dirs are the caller's to remove."""
    aside: list[tuple[Path, Path]] = []  # (target, old)
    moved: list[tuple[Path, Path]] = []  # (tmp, target)
    current: OutputSpec | None = None
    try:
        for _tmp, target, o in outputs:
            current = o
            if os.path.lexists(target):
                old = target.parent / f".{target.name}.fusionlang-old-{os.getpid()}"
                os.rename(target, old)
                aside.append((target, old))
        for tmp, target, o in outputs:
            current = o
            os.rename(tmp, target)
            moved.append((tmp, target))
    except BaseException as e:
        for tmp, target in reversed(moved):
            try:
                os.rename(target, tmp)
            except OSError:
                pass
        for target, old in reversed(aside):
            try:
                os.rename(old, target)
            except OSError:
                pass
        if isinstance(e, OSError) and current is not None:
            from .outputs import shown

            raise RunError(f"cannot move output '{current.name}' into place at '{shown(current.path)}': "
                           f"{e.strerror or e}; no output was changed",
                           "make sure the output path is a plain directory you may replace (not a mount point "
                           "or an immutable directory), or choose another path", "E016", current.at) from None
        raise
    for _target, old in aside:
        shutil.rmtree(old, ignore_errors=True)


def run_plan(plan: Plan, device: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
             progress: Callable[[int, int], None] | None = None) -> RunStats:
    """Run a plan and commit all its outputs together (docs/language.md, "Where outputs
    go"). `progress(done, total)` is called after each piece written. Raises RunError:
    E016 (a save path that breaks a rule, an unwritable or uncommittable output), E030 (a
    value beyond the output dtype's range), E031 (NaN or inf in an output), E011 (an
    unreadable input); each located at its save or source call when the plan knows it.
    Nothing is left behind on any error or interruption."""
    return Executor(plan, device, shard_bytes, progress).run()
