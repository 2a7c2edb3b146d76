"""Ray as fusionlang's cluster: connecting, running tasks with back-pressure, and turning
a task's failure back into the error it raised (`--executor ray`; the optional extra
`pip install 'fusionlang[ray]'`).

Nothing here is home-made cluster code: tasks, retries, scheduling by resources and the
object store are Ray's. The contract is **shared storage**: every worker reads the input
models' safetensors files at the paths the plan names (a local instance shares this
machine's disk; a multi-node cluster needs the same paths mounted on every node, e.g.
NFS). Workers write nothing of the user's: results come back to the driver, which
writes and commits the outputs as the local executor does.

Only this module and `ray_scheduler` import ray, and only when a run asks for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import RunError

E_EXECUTOR = "E032"
INSTALL_HINT = "install the extra (pip install 'fusionlang[ray]') or run with --executor local"
# A task whose worker died (killed, out of memory, node lost) runs again this many times;
# a task that raised an error of its own (a user error: a bad input, a non-finite value) does not.
MAX_RETRIES = 3


@dataclass
class Cluster:
    """A connection to a Ray cluster. `started`: this process started a local instance
    (and `close()` stops it); `cpus`/`gpus`: the cluster's resources when connected;
    `node_cpus` / `node_memory`: the most CPUs and `memory` bytes one live node offers
    (what a single task can get; 0: unknown)."""

    address: str | None
    started: bool
    cpus: int
    gpus: int
    node_cpus: int = 0
    node_memory: int = 0
    keeper: tuple | None = None  # (event, thread) of `connect_early`: the thread that stops Ray

    def close(self) -> None:
        """Stop the local instance this process started (a cluster it joined keeps running)."""
        if self.keeper is not None:
            release, thread = self.keeper
            release.set()
            thread.join()
            return
        self.stop()

    def stop(self) -> None:
        """`close()` on the thread that connected."""
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()


_CONNECTING = threading.Lock()  # one ray.init at a time (`connect_early`'s thread and a search's)


def connect_early(address: str | None = None) -> Callable[[], Cluster]:
    """`connect(address)` on a thread, so that a local instance starts (about 3 s) while
    the caller compiles the spec; the returned function waits for it and returns the
    Cluster, or raises its RunError. The caller closes the Cluster (a later `connect`
    in this process reuses the connection and does not own it).

    NOTE: Ray's processes end with the thread that started them (they are started with
    PR_SET_PDEATHSIG), so that thread lives until the Cluster is closed, and stops them."""
    box: dict[str, Any] = {}
    ready, release = threading.Event(), threading.Event()

    def target() -> None:
        try:
            box["cluster"] = cluster = connect(address)
        except BaseException as e:  # noqa: BLE001 (raised by the waiting caller)
            box["error"] = e
            ready.set()
            return
        cluster.keeper = (release, threading.current_thread())
        ready.set()
        release.wait()
        cluster.stop()

    threading.Thread(target=target, daemon=True, name="fusionlang-ray-start").start()

    def result() -> Cluster:
        ready.wait()
        if "error" in box:
            raise box["error"]
        return box["cluster"]

    return result


def connect(address: str | None = None) -> Cluster:
    """Join the Ray cluster at `address` ("auto", "ray://host:10001", "host:6379"), or
    the one `ray.init` finds ($RAY_ADDRESS), or start a local instance with this
    machine's CPUs; reuses a connection this process already has.

    Raises RunError (E032) when Ray is not installed or the cluster cannot be reached."""
    with _CONNECTING:
        return _connect(address)


def _connect(address: str | None) -> Cluster:
    try:
        import ray
    except ImportError:
        raise RunError("--executor ray needs Ray, which is not installed", INSTALL_HINT, E_EXECUTOR) from None
    # NOTE: a failed task's siblings are cancelled unread; Ray would print each of their errors
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return _described(address, False)
    import logging
    import warnings

    # NOTE: ERROR, not WARNING: Ray's start-up notices (token authentication) are not the user's business
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                              "configure_logging": True, "log_to_driver": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's notices about its own future defaults
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
                ray.init(num_cpus=cpus, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"at '{address}'" if address else "on this machine"
            raise RunError(f"cannot start or reach a Ray cluster {where}: {str(e).splitlines()[0] if str(e) else e}",
                           "start the head node with `ray start --head` and pass its address (--address HOST:6379), "
                           "or omit --address to start a local instance", E_EXECUTOR) from None
    return _described(address, not address)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise RunError (E032) at once when a HOST:PORT (or ray://HOST:PORT) address refuses
    a TCP connection; ray.init would retry for minutes. "auto" and other forms pass."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RunError(f"cannot reach the Ray cluster at '{address}': {e.strerror or e}",
                       "start the head node there with `ray start --head --port PORT` (docs/cluster.md), check the "
                       "address, or omit --address to start a local instance", E_EXECUTOR) from None


def _described(address: str | None, started: bool) -> Cluster:
    import ray

    res = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return Cluster(address, started, int(res.get("CPU", 0)), int(res.get("GPU", 0)),
                   int(max((n.get("CPU", 0) for n in nodes), default=0)),
                   int(max((n.get("memory", 0) for n in nodes), default=0)))


# Environment variables of the driver that a task needs too (caches, zoo, offline mode):
# set in the worker at the start of each task (workers outlive a run and serve the next).
FORWARDED_ENV = ("FUSIONLANG_", "HF_", "TRANSFORMERS_")


def driver_env() -> dict[str, str]:
    """This process's variables whose names start with one of FORWARDED_ENV."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def use_env(env: dict[str, str]) -> None:
    """In a task: the driver's forwarded variables replace the worker's own."""
    for k in [k for k in os.environ if k.startswith(FORWARDED_ENV) and k not in env]:
        del os.environ[k]
    os.environ.update(env)


def unwrap(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` (a `ray.get`), with a task's own exception raised as itself (RunError,
    BadValue, DataError, FuseErrors: the user-facing errors keep their codes and
    places), and a lost worker or object after Ray's retries as RunError E032 naming
    `what` ran."""
    import ray.exceptions as X

    try:
        return fn()
    except X.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except (X.WorkerCrashedError, X.ObjectLostError, X.NodeDiedError, X.OutOfMemoryError,
            X.TaskUnschedulableError, X.RaySystemError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"the Ray worker running {what} was lost after {MAX_RETRIES} retries: {first}",
                       "check the workers' memory (`ray status`; compile prints the memory each task asks for) "
                       "and that every node sees the input files at the same paths", E_EXECUTOR) from None


def imap_unordered(submit: Callable[[Any], Any], items: Iterable[Any], max_in_flight: int,
                   what: Callable[[Any], str] = str) -> Iterator[tuple[Any, Any]]:
    """Run `submit(item)` (which returns a Ray ObjectRef) for each item, at most
    `max_in_flight` at a time (back-pressure: results not yet taken hold memory in the
    object store and, once fetched, in this process), and yield (item, result) in
    completion order. Errors as `unwrap`; the tasks still in flight are cancelled when
    the caller stops early or a task fails."""
    import ray

    pending: dict[Any, Any] = {}
    it = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < max(1, max_in_flight):
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[submit(item)] = item
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item = pending.pop(ref)
                yield item, unwrap(lambda ref=ref: ray.get(ref), what(item))
    finally:
        for ref in pending:
            ray.cancel(ref, force=False)
