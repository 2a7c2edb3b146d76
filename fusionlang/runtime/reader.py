"""Reading input tensors: safetensors files mapped read-only, tensors as zero-copy views;
the device a run computes on; the heap settings and memory of a streaming run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..plan.graph import Plan
from .errors import RunError

# safetensors dtype name -> torch dtype: what is loaded, and what a cast writes (integer
# and bool buffers, e.g. position_ids, pass through merges unchanged)
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class MappedFile:
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
        """Tensor `name` as a read-only view of the mapping, in its stored dtype and shape."""
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


@dataclass(frozen=True)
class FileSpans:
    """A value that is, byte for byte, the concatenation of ranges of input files
    `(path, offset, nbytes)`, of shape `shape`: a unit that copies input tensors
    unchanged (`runner.Runner._copy`) hands the sink these instead of the bytes, and the
    sink copies them file to file in the kernel (`sinks.copy_spans`)."""

    spans: tuple[tuple[str, int, int], ...]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.spans)


class TensorReader:
    """The input tensors of a plan, by reference (source key, tensor name, row block):
    files are mapped on first use and kept open for the run; `bytes_read` counts the
    bytes of every view handed out."""

    def __init__(self, plan: Plan, device: torch.device):
        import threading

        self.plan = plan
        self.device = device
        self._files: dict[str, MappedFile] = {}
        self.bytes_read = 0
        self._lock = threading.Lock()  # units computed side by side share the reader
        self.stager = None  # staging.Stager: the inputs of the next units, read ahead

    def view(self, source: str, tensor: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The stored tensor (or rows [rows[0], rows[1]) of it) as a read-only view of the
        mapped file, in its stored dtype. Raises RunError (E011) when the file cannot be
        read or no longer holds the tensor."""
        file = self.plan.sources[source].tensors[tensor][2]
        with self._lock:
            h = self._mapped(file)
            try:
                t = h.tensor(tensor)  # NOTE: under the lock: its warnings filter is not thread-safe
            except (KeyError, ValueError, RuntimeError) as e:
                raise RunError(f"cannot read tensor '{tensor}' from '{file}': {e}",
                               "the file is corrupt or changed since compile; re-run compile") from None
        if rows is not None:
            t = t[rows[0]:rows[1]]
        with self._lock:
            self.bytes_read += t.numel() * t.element_size()
        return t

    def span(self, source: str, tensor: str, rows: tuple[int, int] | None = None) -> tuple[str, int, int]:
        """(file, offset, nbytes) of the stored tensor (or rows [rows[0], rows[1]) of it)
        in its safetensors file, from the file's header (for a tensor `view` has checked;
        not counted as read). Raises RunError (E011) when the file cannot be mapped."""
        file = self.plan.sources[source].tensors[tensor][2]
        with self._lock:
            h = self._mapped(file)
        info = h.header[tensor]
        start, end = info["data_offsets"]
        if rows is not None and info["shape"] and info["shape"][0]:
            row = (end - start) // info["shape"][0]
            start, end = start + rows[0] * row, start + rows[1] * row
        return file, h.start + start, end - start

    def _mapped(self, file: str) -> MappedFile:
        """The mapping of `file`, made on first use (the caller holds the lock)."""
        h = self._files.get(file)
        if h is None:
            try:
                h = MappedFile(file)
            except (OSError, ValueError, json.JSONDecodeError) as e:
                raise RunError(f"cannot read '{file}': {e}", "the model file changed or is corrupt; re-run compile") from None
            self._files[file] = h
        return h

    def load(self, source: str, tensor: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor as a private float32 buffer on the run's device (ops may update it in
        place): the copy the stager read ahead, else read now. Raises RunError (E011)."""
        if self.stager is not None:
            staged = self.stager.take((source, tensor, rows))
            if staged is not None:
                return staged
        return self.load_direct(source, tensor, rows)

    def load_direct(self, source: str, tensor: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`load` without the stager: read and converted on this thread."""
        t = self.view(source, tensor, rows)
        # NOTE: the conversion (or copy, for fp32) makes a private buffer that ops may
        # reuse in place; the mapped view itself is never written. Integer and bool
        # buffers are computed in float32 too (exact below 2**24) and cast back on output.
        if t.dtype != torch.float32:
            return t.to(self.device).float() if self.device.type != "cpu" else t.float()
        return t.to(self.device, copy=True)


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for `name` ("auto": CUDA, else MPS, else CPU). Raises RunError
    (E006) when the requested device is not available."""
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


_LIBC = None


def trim_heap() -> None:
    """Give free heap pages back to the OS (after a group of odd-sized whole tensors,
    whose freed blocks would otherwise fragment the heap and pile up)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_freed_memory() -> None:
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


def available_memory() -> int:
    """Bytes of memory available to new allocations, or 0 when unknown: Linux's
    MemAvailable, capped by the process's cgroup v2 limit (a container's `memory.max`
    less its `memory.current`)."""
    free = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            rel = next((line.strip().split("::", 1)[1] for line in f if line.startswith("0::")), None)
        if rel is not None:
            base = f"/sys/fs/cgroup{rel.rstrip('/')}"
            with open(f"{base}/memory.max", encoding="ascii") as f:
                limit = f.read().strip()
            if limit != "max":
                with open(f"{base}/memory.current", encoding="ascii") as f:
                    left = max(0, int(limit) - int(f.read().strip()))
                free = min(free, left) if free else left
    except (OSError, ValueError):
        pass
    return free
