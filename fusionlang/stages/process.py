"""Model stages computed in a separate Python process, next to the run.

A short stage (a router's forward pass, `runtime.scheduler.BACKGROUND_STAGES`) runs
beside the units that need none of its results. On a thread it competes with the
writer for the GIL (its transformers import and model load hold it for seconds); in its
own process (`python -m fusionlang.stages.process`, a plain subprocess: no
multiprocessing start method re-imports the user's script) it has a core to itself.

Protocol: the parent writes one pickle `(jobs, device, threads)` to the child's stdin
and keeps stdin open; the child writes one pickle `(index, result, error)` per job to
its stdout (its own prints go to stderr) and exits when stdin reaches EOF, so a parent
that dies or fails takes the child with it. `run_stages(..., remote=process_runner())`
caches the results; a job the child could not finish (it crashed, or could not start)
is computed on the parent's thread as before.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import traceback


def compute_job(stage: dict, names: list[str], device: str, threads: int, at: tuple | None):
    """One model stage's result (`stages.run.compute`) with `threads` intra-op threads;
    progress lines go to stderr. A bad data value is raised as RunError at `at` (the
    stage's call). Used by this module's child and by the Ray executor's tasks."""
    import torch

    from ..runtime.errors import RunError
    from ..runtime.reader import pick_device
    from .data import DataError
    from .run import compute

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    torch.set_num_threads(threads)
    try:
        return compute(stage, pick_device(device), None, log, names)
    except DataError as e:
        raise RunError(e.message, e.hint, e.code, at) from None


def process_runner(device: str = "cpu", threads: int = 1, log=None):
    """`run_stages`' `remote`: computes the given stage jobs [(stage, tensor names, key,
    at)] one after another in one child process with `threads` intra-op threads and
    yields (job, result) as each finishes. Raises the RunError a job raised (a bad data
    value, located at the stage's call); stops yielding, without raising, when the child
    cannot start or ends early (the caller computes the rest itself; `log(line)` says so)."""

    def early(why: str) -> None:
        if log:
            log(f"the model stage process {why}: computing the stage here instead")

    def run(jobs):
        jobs = list(jobs)
        try:
            child = _take()
        except OSError as e:
            early(f"could not start ({e})")
            return
        try:
            try:
                pickle.dump(([(st, names, at) for st, names, _key, at in jobs], device, threads), child.stdin)
                child.stdin.flush()
            except OSError:  # it ended at once (a broken pipe)
                early(f"ended at its start (exit code {_exit_code(child)})")
                return
            for _ in jobs:
                try:
                    index, result, error = pickle.load(child.stdout)
                except Exception:  # noqa: BLE001 (EOF, a torn frame: the child ended)
                    early(f"ended without a result (exit code {_exit_code(child)})")
                    return
                if error is not None:
                    raise error
                yield jobs[index], result
        finally:
            for pipe in (child.stdin, child.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            _exit_code(child)

    run.where = "in a separate process"
    return run


_WARM: list = []  # (child, its environment) started by `prestart`, not yet given jobs


def _spawn() -> subprocess.Popen:
    # NOTE: this process's import path, so that the child finds fusionlang wherever this
    # process did (a source checkout on sys.path, not only an installed package)
    path = os.pathsep.join(p for p in sys.path if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    # NOTE: its own session: Ctrl-C reaches the run only, whose exit closes the child's stdin
    return subprocess.Popen([sys.executable, "-m", "fusionlang.stages.process"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, start_new_session=True)


def _take() -> subprocess.Popen:
    """The prestarted child when it is alive and has this process's environment (a
    long-lived caller may have changed it since), else a new one. Raises OSError."""
    while _WARM:
        child, env = _WARM.pop()
        if child.poll() is None and env == dict(os.environ):
            return child
        for pipe in (child.stdin, child.stdout):
            pipe.close()  # it ends on EOF
    return _spawn()


def prestart() -> None:
    """Start the stage process now, so that its imports (torch, transformers: ~3 s) overlap
    the compile; the next `process_runner` job uses it. Unused, it ends with this process
    (its stdin closes). Does nothing when it cannot start."""
    if not _WARM:
        try:
            _WARM.append((_spawn(), dict(os.environ)))
        except OSError:
            pass


def prestart_for(spec_file: str) -> None:
    """`prestart` when the spec at `spec_file` calls `moe` with routers from prompts (a
    gate_mode other than "random" / "uniform_random"): a cheap parse before the compile.
    A spec that cannot be read or parsed is left to the compile to report."""
    from pathlib import Path

    from ..lang import ast
    from ..lang.parser import parse

    try:
        module = parse(Path(spec_file).read_text(), spec_file)
    except Exception:  # noqa: BLE001 (the compile reports it, located)
        return

    stack = [e for st in module.stmts for e in ast.stmt_exprs(st)]
    while stack:
        e = stack.pop()
        stack.extend(ast.children(e))
        if isinstance(e, ast.Call) and e.func.rsplit(".", 1)[-1] == "moe":
            mode = next((k.value for k in e.kwargs if k.name == "gate_mode"), None)
            if not (isinstance(mode, ast.String) and mode.value in ("random", "uniform_random")):
                prestart()
                return


def _exit_code(child: subprocess.Popen) -> int:
    """The child's exit code, killing it when it has not ended 5 s after its pipes closed."""
    try:
        return child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def _exit_with_parent() -> None:
    """Wait for EOF on stdin (the parent closed it, or died), then end this process."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    finally:
        os._exit(0)


def _frame(i: int, result, error: BaseException | None) -> bytes:
    """One job's answer, pickled; an error (or a result) that does not survive a pickle
    round trip is sent as a RuntimeError holding the child's traceback text."""
    try:
        frame = pickle.dumps((i, result, error))
        pickle.loads(frame)
        return frame
    except Exception:  # noqa: BLE001 (anything unpicklable: reported, not raised)
        why = "".join(traceback.format_exception(error)) if error is not None else traceback.format_exc()
        return pickle.dumps((i, None, RuntimeError(f"the model stage process could not send its answer:\n{why}")))


def main() -> None:
    """The child: reads the jobs, writes each result (or the error it raised) back, then
    ends with os._exit (the stdin watcher thread may hold stdin's lock: a normal
    interpreter shutdown would abort on it)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the result stream
    import torch  # noqa: F401  (the imports a model stage needs, before the jobs arrive:
    import transformers.modeling_utils  # noqa: F401  ~3 s that a prestarted child overlaps with the compile)

    try:
        jobs, device, threads = pickle.load(sys.stdin.buffer)
    except EOFError:  # a prestarted child that was not needed
        os._exit(0)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    if os.environ.get("FUSIONLANG_STAGE_PROCESS_CRASH"):  # fault injection for the tests
        os._exit(3)
    for i, (stage, names, at) in enumerate(jobs):
        try:
            result, error = compute_job(stage, names, device, threads, at), None
        except Exception as e:  # noqa: BLE001 (sent to the parent, which raises it)
            result, error = None, e
        out.write(_frame(i, result, error))
        out.flush()
    out.close()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
