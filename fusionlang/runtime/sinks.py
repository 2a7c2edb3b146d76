"""Where a run's results go: each output's safetensors shards, written as values are
computed, and the commit that moves every finished output into place, all or none
(docs/language.md, "Where outputs go")."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..plan.graph import OutputSpec, Plan
from .errors import RunError
from .model_files import finish_output
from .outputs import RunLock, check_paths, clean_leftovers, shown
from .reader import FileSpans
from .sources import DTYPE_SIZES

DEFAULT_SHARD_BYTES = 4 * 1024**3


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
        self.out = out
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
        from ..arch.lora import WEIGHTS_FILE, is_adapter

        if is_adapter(out.description):  # PEFT reads one adapter_model.safetensors
            shards = [[t for part in shards for t in part]]
        total = len(shards)
        self.names = [WEIGHTS_FILE if is_adapter(out.description) else "model.safetensors"] if total == 1 else \
            [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
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
        nbytes = value.nbytes  # a tensor's or a FileSpans'
        if first_row:
            off += first_row * (nbytes // value.shape[0])
        assert nbytes <= n, f"{tensor}: {nbytes} bytes, header says {n}"
        if isinstance(value, FileSpans):
            # NOTE: no memory is held while it waits: queued without counting its bytes
            self.queue.submit(functools.partial(self._copy, tensor, value.spans, self.fds[si], off), 0,
                              self.dir / self.names[si])
            return nbytes
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        # NOTE: `data` (a view of the tensor) keeps the tensor alive until it is written
        write_all = functools.partial(_pwrite_all, self.fds[si], data, off)
        if owned:
            self.queue.submit(write_all, data.nbytes, self.dir / self.names[si])
        else:
            # NOTE: e.g. a cast to the dtype a value already has returns that value, and a
            # later op may update it in place: it must be written now.
            self.queue.run_now(write_all, self.dir / self.names[si])
        return data.nbytes

    def _copy(self, tensor: str, spans, fd: int, off: int) -> None:
        """`copy_spans` on the write thread; an unreadable input is located at this
        output's save, naming the tensor (the unit that handed the spans is long done)."""
        try:
            copy_spans(spans, fd, off)
        except RunError as e:
            e.message += f" (tensor '{tensor}' of output '{self.out.name}')"
            e.at = e.at or self.out.at
            raise

    def close(self) -> None:
        """Close the shard files (after the queue is drained or stopped)."""
        # NOTE: no fsync: atomicity against interruption comes from the rename of the
        # finished directory; durability across power loss is the filesystem's job.
        for fd in self.fds:
            os.close(fd)
        self.fds = []


COPY_CHUNK = 8 << 20  # bytes per read/write where the kernel cannot copy file to file


def copy_spans(spans, fd: int, off: int) -> None:
    """Write the input file ranges `spans` [(path, offset, nbytes)], one after the other,
    into `fd` from offset `off`: `os.copy_file_range` (the kernel copies page cache to
    page cache, or shares the blocks on file systems that can), else — other systems,
    or file systems that refuse it (EXDEV, EOPNOTSUPP, ...) — reads and writes of
    COPY_CHUNK bytes. Raises RunError (E011) for an input that cannot be opened or read
    or ends early, OSError for the output's errors (a full disk: `_WRITE_ERRORS`)."""
    fast = hasattr(os, "copy_file_range")
    for path, start, n in spans:
        try:
            src = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise _unreadable(path, e.strerror or str(e)) from None
        try:
            done = 0
            while done < n and fast:
                try:
                    step = os.copy_file_range(src, fd, n - done, start + done, off + done)
                except OSError as e:
                    if e.errno in _WRITE_ERRORS:
                        raise  # the output's side: E016 (WriteQueue)
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                        raise _unreadable(path, e.strerror or str(e)) from None
                    step = 0
                if step == 0:  # refused, or a file system that reports 0: read and write instead
                    fast = False
                    break
                done += step
            while done < n:
                try:
                    data = os.pread(src, min(COPY_CHUNK, n - done), start + done)
                except OSError as e:
                    raise _unreadable(path, e.strerror or str(e)) from None
                if not data:
                    raise _unreadable(path, f"it ends before byte {start + n}")
                _pwrite_all(fd, data, off + done)
                done += len(data)
        finally:
            os.close(src)
        off += n


# errors of the file written to (the rest, in a file-to-file copy, are the input's)
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _unreadable(path: str, why: str) -> RunError:
    return RunError(f"cannot read '{path}': {why}", "the model file changed or is corrupt; re-run compile", "E011")


def _pwrite_all(fd: int, data, off: int) -> None:
    view = memoryview(data)
    while len(view):
        written = os.pwrite(fd, view, off)
        view, off = view[written:], off + written


def _nbytes(dtype: str, shape) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n



class OutputSink:
    """Every output of a plan, written into temporary directories next to their targets
    and committed together. `open()` checks the save paths and lays out the shards,
    `write()` stores a computed piece, `commit()` finishes and moves all outputs into
    place, `abort()` removes everything this run created. Raises RunError (E016)."""

    def __init__(self, plan: Plan, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.plan = plan
        self.shard_bytes = shard_bytes
        self.queue = WriteQueue()
        self.tmp_dirs: dict[str, Path] = {}
        self.writers: dict[str, ShardWriter] = {}
        self.targets: dict[str, str] = {}
        self.locks: dict[str, RunLock] = {}
        self.created_dirs: list[Path] = []  # parents this run created, deepest first

    def open(self) -> None:
        self.targets = prepare_outputs(self.plan)  # output key -> the directory to replace (symlinks resolved)
        for okey, o in self.plan.outputs.items():
            self.tmp_dirs[okey] = self._make_tmp(okey, self.targets[okey], o)
            self.writers[okey] = ShardWriter(o, self.tmp_dirs[okey], self.shard_bytes, self.queue)

    def write(self, okey: str, tensor: str, value: torch.Tensor, first_row: int = 0, owned: bool = False) -> int:
        """Store `value` as tensor `tensor` of output `okey` (or its rows from `first_row`);
        returns the bytes written (see ShardWriter.write for `owned`)."""
        return self.writers[okey].write(tensor, value, first_row, owned)

    def commit(self) -> None:
        """Finish every output (config, tokenizer, model card) and move all into
        place; SIGINT and SIGTERM wait until the commit is whole (or undone)."""
        import signal

        self.queue.drain()
        self.queue.close()
        for okey, o in self.plan.outputs.items():
            self.writers[okey].close()
            try:
                finish_output(self.plan, o, self.tmp_dirs[okey])
            except (OSError, shutil.Error) as e:
                raise RunError(f"cannot finish output '{o.name}' (config, tokenizer and model files next to the "
                               f"weights): {_os_error_text(e)}", "check that the input model's files are readable and "
                               "the output's file system has room", "E016", o.at) from None
        blockable = hasattr(signal, "pthread_sigmask")
        if blockable:
            saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            commit_all([(self.tmp_dirs[k], Path(self.targets[k]), o, Path(self.locks[k].sibling("old")))
                        for k, o in self.plan.outputs.items()])
        finally:
            if blockable:
                signal.pthread_sigmask(signal.SIG_SETMASK, saved)
        self._release()

    def abort(self) -> None:
        """After a failure: stop writing, remove every temporary output and the parent
        directories this run created."""
        self.queue.close()
        for w in self.writers.values():
            for fd in w.fds:
                os.close(fd)
            w.fds = []
        for d in self.tmp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        self._release()
        for d in self.created_dirs:
            try:
                d.rmdir()
            except OSError:
                pass

    def _release(self) -> None:
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()

    def _make_tmp(self, okey: str, path: str, o: OutputSpec | None = None) -> Path:
        """This run's fresh `.NAME.fusionlang-tmp-TOKEN` directory next to `path`, under
        its lock (`outputs.RunLock`); missing parents are created (and removed again if
        the run fails). Raises RunError (E016)."""
        target = Path(path)
        try:
            missing = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.created_dirs.extend(sorted(missing, key=lambda p: -len(p.parts)))
            self.locks[okey] = lock = RunLock(str(target))
            tmp = Path(lock.sibling("tmp"))
            tmp.mkdir()  # never an existing folder: the token is this run's
        except OSError as e:
            raise RunError(f"cannot write to '{path}': {_os_error_text(e)}", "choose an output directory you can write to",
                           "E016", o.at if o else None) from None
        return tmp


def _os_error_text(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e)) if isinstance(e, OSError) else str(e)


def prepare_outputs(plan: Plan) -> dict[str, str]:
    """Before any work: check the save-path rules (`outputs.check_paths`, for saved JSON
    plans too), then clean the leftovers of killed runs next to every output
    (`outputs.clean_leftovers`). Returns output key -> the real directory to replace.
    Raises RunError (E016, located at the save) when a rule is broken or a leftover
    cannot be restored."""
    inputs = [(k, s.path, sorted({f for _, _, f in s.tensors.values() if f})) for k, s in plan.sources.items()
              if not s.stage]
    specs = [f for f in {plan.spec_file, *plan.spec_files} if f and os.path.isfile(f)]
    outs = list(plan.outputs.values())
    problems = check_paths([(o.path, _where(o)) for o in outs], inputs, specs)
    if problems:
        p = problems[0]
        raise RunError(p.message, p.hint, "E016", outs[p.index].at)
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
    return targets


def _where(o: OutputSpec) -> str:
    return f"{o.at[0]}:{o.at[1]}:{o.at[2]}" if o.at else o.loc or o.path


def commit_all(outputs: list[tuple[Path, Path, OutputSpec, Path]]) -> None:
    """Move every finished output (tmp dir, target, spec, where to move the previous
    output) into place, all or none: first every existing target is moved aside (to
    `.NAME.fusionlang-old-TOKEN`, see outputs.RunLock), then every temp
    dir is moved in, and the old ones are deleted only when all are in place. On any
    failure (or interruption) everything moved so far is moved back and RunError (E016,
    located at the save that failed) is raised; the temp dirs are the caller's to remove."""
    aside: list[tuple[Path, Path]] = []  # (target, old)
    moved: list[tuple[Path, Path]] = []  # (tmp, target)
    current: OutputSpec | None = None
    try:
        for _tmp, target, o, old in outputs:
            current = o
            if os.path.lexists(target):
                os.rename(target, old)
                aside.append((target, old))
        for tmp, target, o, _old in outputs:
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
            raise RunError(f"cannot move output '{current.name}' into place at '{shown(current.path)}': "
                           f"{e.strerror or e}; no output was changed",
                           "make sure the output path is a plain directory you may replace (not a mount point "
                           "or an immutable directory), or choose another path", "E016", current.at) from None
        raise
    for _target, old in aside:
        shutil.rmtree(old, ignore_errors=True)
