"""The `fusionlang` command line: check, compile, run, fmt (rich output).

Exit codes: 0 ok, 1 user error, 2 internal error. A user never sees a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

from .runtime.openmp import set_wait_policy

set_wait_policy()  # NOTE: before torch loads OpenMP (runtime/openmp.py: a short spin, then sleep)

from rich.console import Console
from rich.table import Table

from .lang.diagnostics import Diagnostic, FuseErrors, Span, render_all, to_json
from .pipeline import load_plan, make_tuner, remove_eval_tmpdir

# NOTE: tables are wide; when stderr is not a terminal (CI logs, pipes) use 120 columns
# rather than rich's 80, so result tables are not truncated.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)
out = Console(highlight=False)


def _color() -> bool:
    return console.is_terminal and not os.environ.get("NO_COLOR")


def _print_diags(diags: list[Diagnostic]) -> None:
    diags = sorted(diags, key=lambda d: (d.severity != "error", d.span.file, d.span.line, d.span.col))
    if diags:
        sys.stderr.write(render_all(diags, _color()) + "\n")
        n_err = sum(d.severity == "error" for d in diags)
        if n_err:
            sys.stderr.write(f"\n{n_err} error{'s' * (n_err != 1)}\n")


# ---------------------------------------------------------------------- commands
def cmd_check(args) -> int:
    from .pipeline import check

    results = [check(f) for f in args.files]
    if args.format == "json":
        print(json.dumps([{"file": r.file, "ok": r.ok, "diagnostics": json.loads(to_json(r.diagnostics)),
                           "unverified": r.unverified} for r in results], indent=2))
    else:
        for r in results:
            _print_diags(r.diagnostics)
            status = "[green]ok[/]" if r.ok else "[red]failed[/]"
            console.print(f"{r.file}: {status}", soft_wrap=True)
            if r.unverified and r.ok:
                console.print("  [yellow]not verified[/] (model files absent): tensor names, shapes, dtypes and rule patterns",
                              soft_wrap=True)
                for u in r.unverified:
                    console.print(f"    {u}", soft_wrap=True, markup=False)
    return 0 if all(r.ok for r in results) else 1


def _summary(prog, lowered, plan) -> None:
    from .pipeline import estimate_peak_bytes

    t = Table(title=f"plan for {prog.file}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("models", ", ".join(f"{k} ({len(s.tensors)} tensors)" for k, s in plan.sources.items() if not s.stage))
    stages = [(k, s) for k, s in plan.sources.items() if s.stage]
    if stages:
        from .plan.emit import stage_line

        t.add_row("model stages", "\n".join(stage_line(k, s.stage, len(s.tensors))[len("stage "):] for k, s in stages)
                  + "\n[dim](run first; results cached by content hash in $FUSIONLANG_CACHE/stages)[/]")
    t.add_row("outputs", ", ".join(f"{o.name} -> {o.path}" + (f" ({o.note})" if o.note else "")
                                   for o in plan.outputs.values()))
    t.add_row("tensors", str(sum(len(o.tensors) for o in plan.outputs.values())))
    t.add_row("ops", f"{len(lowered.nodes)} lowered -> {len(plan.nodes)} after passes "
              + " ".join(f"[dim]{n}:{c}[/]" for n, c in plan.history[1:]))
    counts = plan.count_ops()
    t.add_row("op mix", ", ".join(f"{k}×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    t.add_row("phases", str(max(plan.phase_of.values(), default=0) + 1))
    t.add_row("bytes read", _human(plan.bytes_read()))
    t.add_row("bytes written", _human(plan.bytes_written()))
    peak = _human(estimate_peak_bytes(plan)) + " (largest tensor group, fp32)"
    stage_peak = max((s.stage.get("estimate", {}).get("peak_bytes", 0) for s in plan.sources.values() if s.stage),
                     default=0)
    if stage_peak:
        peak += f"; model stages: {_human(stage_peak)} (the largest stage: its resident models and statistics)"
    t.add_row("est. peak memory", peak)
    from .eval.tuning import find_sites

    sites = find_sites(prog)
    if sites:
        t.add_row("tune()", "; ".join(f"{s.merge.split('::')[-1]}.{s.param} in "
                                      + (f"between({s.range[0]:g}, {s.range[1]:g}{', log' * s.range[2]})" if s.range
                                         else f"{[round(v, 6) for v in s.values]}")
                                      + (f" (search, budget {s.settings['budget'][0]:g})" if "budget" in s.settings
                                         else "")
                                      for s in sites)
                  + " [dim](planned with the first candidate, a range's low end; `run` chooses on the validation "
                  "split)[/]")
    console.print(t)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _check_pass_args(args) -> None:
    from .passes import PASSES

    names = [n for n, _ in PASSES]
    bad = [p for p in ([args.dump_after] if args.dump_after else []) + (args.passes.split(",") if args.passes else [])
           if p and p not in names]
    if bad:
        raise FuseErrors([Diagnostic("E004", f"unknown pass '{bad[0]}'", Span("<command line>", 1, 1),
                                     f"passes: {', '.join(names)}")])


def _compile(args, tuner=None):
    from .pipeline import compile_spec
    from .plan import emit

    _check_pass_args(args)

    dumps: list[str] = []

    def on_dump(name, plan):
        dumps.append(f"# --- after {name}\n" + emit.to_text(plan))

    passes = None
    if getattr(args, "passes", None) is not None:
        passes = {p for p in args.passes.split(",") if p}
    prog, lowered, plan = compile_spec(args.spec, passes, getattr(args, "dump_after", None),
                                       getattr(args, "verify_passes", False), on_dump, tuner)
    if prog.warnings:
        _print_diags(list(prog.warnings))
    for d in dumps:
        sys.stdout.write(d)
    return prog, lowered, plan


def cmd_compile(args) -> int:
    from .plan import emit

    if args.estimate_cluster is not None:  # E006 before compiling
        from .plan.cluster import check_cluster_args

        check_cluster_args(args.estimate_cluster, args.disk_gbps, args.net_gbps, args.mem_gbps, args.storage_gbps,
                           args.slots)
    prog, lowered, plan = _compile(args)
    remove_eval_tmpdir(plan)  # compile writes nothing but the emitted plan
    if args.emit:
        text = {"text": emit.to_text, "json": emit.to_json, "dot": emit.to_dot}[args.emit](plan)
        if args.output:
            _write_text(args.output, text)
        else:
            sys.stdout.write(text)
    if not args.quiet:
        _summary(prog, lowered, plan)
    if args.estimate_cluster is not None:
        from .plan.cluster import estimate_cluster, print_estimate

        print_estimate(console, estimate_cluster(plan, args.estimate_cluster, args.disk_gbps, args.net_gbps,
                                                 args.mem_gbps, args.storage_gbps, args.slots))
    return 0


def _write_text(path: str, text: str) -> None:
    try:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise FuseErrors([Diagnostic("E016", f"cannot write '{path}': {e.strerror}", Span("<command line>", 1, 1),
                                     "choose a writable path")]) from None


def cmd_run(args) -> int:
    plan_box: list = []
    ray_start: list = []  # `ray_cluster.connect_early`'s result, started before compiling
    try:
        return _cmd_run(args, plan_box, ray_start)
    finally:
        if plan_box:  # evaluations remove it when they run; a failed or interrupted run must too
            remove_eval_tmpdir(plan_box[0])
        if ray_start:
            import contextlib

            # NOTE: a start that failed was reported by the run's own connect, or the run had failed already
            with contextlib.suppress(Exception):
                ray_start[0]().close()  # waits for a start still under way: no Ray process is left behind


def _cmd_run(args, plan_box: list, ray_start: list) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not math.isfinite(args.shard_size) or args.shard_size <= 0 or args.shard_size * 1024**3 < 1:
        raise FuseErrors([Diagnostic("E006", f"--shard-size must be a positive, finite number of GB, not {args.shard_size:g}",
                                     Span("<command line>", 1, 1), "a size in GB, e.g. --shard-size 2")])
    if args.address and args.executor != "ray":
        raise FuseErrors([Diagnostic("E006", "--address names a Ray cluster, but the executor is local",
                                     Span("<command line>", 1, 1), "add --executor ray, or drop --address")])
    if args.spec.endswith(".json"):
        plan = load_plan(args.spec)
        name = args.spec
    else:
        if args.executor == "local" and args.device in ("auto", "cpu"):  # (on a GPU stages stay in-process)
            from .stages.process import prestart_for

            prestart_for(args.spec)  # a MoE's router stage: its process imports while this one compiles
        if args.executor == "ray":
            from .runtime.ray_cluster import connect_early

            ray_start.append(connect_early(args.address))  # a local instance starts while the spec compiles
        prog, _lowered, plan = _compile(args, make_tuner(args.device, console, int(args.shard_size * 1024**3),
                                                         args.executor, args.address))
        plan_box.append(plan)
        name = prog.file
    import time

    # (imports torch: after a prestarted stage process started)
    from .runtime.executors import run_plan

    start = [0.0]  # the first piece written: model stages before it are not merge time
    total_bytes = plan.bytes_written()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                  disable=args.quiet or not console.is_terminal) as progress:
        task = progress.add_task(f"merging {name}", total=sum(len(o.tensors) for o in plan.outputs.values()), rate="")

        plain = not args.quiet and not console.is_terminal
        shown_step = [0]

        def tick(done, total):
            # NOTE: `total` counts the pieces written (a tensor split in row blocks is
            # several), so the bar's total is set from it: the count never passes it
            if not start[0]:
                start[0] = time.perf_counter()
            el = max(time.perf_counter() - start[0], 1e-9)
            frac = done / max(total, 1)
            rate = f"{done / el:.1f} tensors/s, {_human(total_bytes * frac / el)}/s"
            progress.update(task, completed=done, total=total, rate=rate)
            step = int(frac * 10)  # not a terminal (a log, CI): a plain line every 10%
            if plain and step > shown_step[0]:
                shown_step[0] = step
                console.print(f"merging {name}: {done}/{total} written ({step * 10}%), {rate}, {el:.1f}s",
                              soft_wrap=True, markup=False, highlight=False)

        stats = run_plan(plan, args.device, int(args.shard_size * 1024**3), tick, executor=args.executor,
                         address=args.address) if plan.outputs else None
    setup = getattr(plan, "eval_setup", None)
    if setup is not None and stats is not None:
        setup.learned = stats.learned
    if setup is not None and setup.ensemble_saves:
        from .eval.ensembles import write_all

        for path in write_all(setup.ensemble_saves):
            console.print(f"ensemble manifest: {path}")
    if stats is None and setup is not None:
        from .eval.evaluation import run as run_evals
        from .runtime.reader import pick_device

        run_evals(setup, pick_device(args.device).type, console)
        return 0
    if not args.quiet:
        t = Table(title="run", title_justify="left")
        for c in ("output", "path", "tensors"):
            t.add_column(c)
        from .eval.evaluation import display_path

        for o in plan.outputs.values():
            t.add_row(o.name, display_path(setup, o.path), str(len(o.tensors)))
        console.print(t)
        console.print(f"read {_human(stats.bytes_read)}, wrote {_human(stats.bytes_written)} in {stats.seconds:.2f}s "
                      f"({_human(stats.bytes_written / max(stats.seconds, 1e-9))}/s written)"
                      + (f"; {stats.side_by_side} units computed side by side on {stats.threads} threads"
                         if stats.side_by_side else ""))
    if setup is not None and setup.reports:
        from .eval.evaluation import run as run_evals
        from .runtime.reader import pick_device

        run_evals(setup, pick_device(args.device).type, console)
    return 0


def cmd_fmt(args) -> int:
    from .lang.fmt import format_source
    from .lang.parser import read_source

    rc = 0
    for f in args.files:
        text = read_source(f)  # E008 if unreadable, E001 at a byte that is not UTF-8
        new = format_source(text, f)
        if args.check:
            if new != text:
                console.print(f"{f}: would reformat")
                rc = 1
        elif args.write:
            if new != text:
                _write_text(f, new)
        else:
            sys.stdout.write(new)
    return rc


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.dir, console, lambda spec: main(["run", spec]))


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusionlang", description="A language and compiler for deep model fusion.")
    p.add_argument("--version", action="version", version=f"fusionlang {__import__('fusionlang').__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="check specs (syntax, names, types; models too when present)")
    c.add_argument("files", nargs="+", help=".fuse spec files")
    c.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: compiler-style diagnostics; json: one object per file (default: text)")
    c.set_defaults(fn=cmd_check)

    for name, fn, helptext in (("compile", cmd_compile, "compile a spec into a merge plan"),
                               ("run", cmd_run, "run a spec or a saved JSON plan")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("spec", help="a .fuse spec" + ("" if name == "compile" else ", or a plan saved with --emit json"))
        c.add_argument("--passes", help="comma-separated passes to run (default: all)")
        c.add_argument("--dump-after", metavar="PASS", help="print the plan after this pass (fold, cse, dce, split, schedule)")
        c.add_argument("--verify-passes", action="store_true", help="re-verify the plan after every pass")
        c.add_argument("-q", "--quiet", action="store_true", help="print only errors and warnings")
        if name == "compile":
            c.add_argument("--emit", choices=["text", "json", "dot"],
                           help="print the plan: text (reviewable), json (runnable with `fusionlang run`), dot (Graphviz)")
            c.add_argument("-o", "--output", help="write the emitted plan here")
            from .plan import cluster as cl

            c.add_argument("--estimate-cluster", type=int, metavar="N",
                           help="print what the plan would cost on N workers (bytes, memory, time) and on one machine "
                                "(also with -q)")
            c.add_argument("--disk-gbps", type=float, default=cl.DEFAULT_DISK_GBPS, metavar="X",
                           help=f"each machine's disk bandwidth, GB/s (10^9 bytes; default {cl.DEFAULT_DISK_GBPS:g})")
            c.add_argument("--net-gbps", type=float, default=cl.DEFAULT_NET_GBPS, metavar="Y",
                           help=f"the driver's network bandwidth, GB/s (default {cl.DEFAULT_NET_GBPS:g}: 10 Gbit/s)")
            c.add_argument("--mem-gbps", type=float, default=cl.DEFAULT_MEM_GBPS, metavar="Z",
                           help=f"fp32 bytes a CPU's ops read and write, GB/s (default {cl.DEFAULT_MEM_GBPS:g})")
            c.add_argument("--storage-gbps", type=float, metavar="S",
                           help="the shared storage's read bandwidth over all workers, GB/s (default: no limit)")
            c.add_argument("--slots", type=int, default=1, metavar="K",
                           help="CPUs per machine: units a worker runs at once (default 1)")
        else:
            c.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                           help="where to compute (auto: CUDA, else MPS, else CPU)")
            c.add_argument("--shard-size", type=float, default=4.0, metavar="GB",
                           help="max GB per output safetensors shard (default 4)")
            c.add_argument("--executor", choices=["local", "ray"], default="local",
                           help="local: this process; ray: tensor groups, model stages and search candidates as "
                                "Ray tasks (pip install 'fusionlang[ray]'; workers read the inputs at the same paths)")
            c.add_argument("--address", metavar="ADDR",
                           help="the Ray cluster to join (e.g. HOST:6379 or ray://HOST:10001; default: $RAY_ADDRESS, "
                                "else a local instance with this machine's CPUs)")
        c.set_defaults(fn=fn)

    c = sub.add_parser("fmt", help="print specs in canonical form")
    c.add_argument("files", nargs="+", help=".fuse spec files")
    g = c.add_mutually_exclusive_group()
    g.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    g.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    c.set_defaults(fn=cmd_fmt)

    c = sub.add_parser("demo", help="build a tiny offline model set and run a merge on it")
    c.add_argument("--dir", default=".fusionlang-demo",
                   help="where to build the models and write demo.fuse (default .fusionlang-demo)")
    c.set_defaults(fn=cmd_demo)

    from .zoo.cli import add_zoo_commands, run_zoo_command

    add_zoo_commands(sub).set_defaults(fn=run_zoo_command)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `docker stop`, CI cancellation), raised in the main thread so
    that a run cleans up exactly as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 user error or interrupted, 2
    internal error, 143 terminated by SIGTERM). SIGTERM is handled like SIGINT while
    the command runs: temporary outputs are removed and nothing partial is left."""
    import signal
    import threading

    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    try:
        return args.fn(args)
    except FuseErrors as e:
        _print_diags(e.diagnostics)
        return 1
    except KeyboardInterrupt as e:
        console.print("[red]interrupted[/]: no output was left behind")
        return 143 if isinstance(e, Terminated) else 1
    except Exception as e:  # noqa: BLE001
        from .runtime.errors import RunError
        from .zoo.errors import ZooError

        if isinstance(e, ZooError):
            console.print(f"[red]error[/]: {e.message}", soft_wrap=True)
            if e.hint:
                console.print(f"  = hint: {e.hint}", soft_wrap=True)
            return 1
        if isinstance(e, RunError):  # located at its save or source call, else the spec or plan that was run
            where = getattr(args, "spec", None) if e.code not in ("E006", "E032") else None
            span = Span(*e.at) if e.at else Span(where or "<command line>", 1, 1)
            _print_diags([Diagnostic(e.code, e.message, span, e.hint)])
            return 1
        if isinstance(e, OSError) and e.filename:
            console.print(f"[red]error[/]: {e.strerror}: {e.filename}")
            return 1
        console.print("[red]internal error[/] (a fusionlang bug; please report it with this trace):")
        traceback.print_exc()
        return 2


if __name__ == "__main__":
    sys.exit(main())
