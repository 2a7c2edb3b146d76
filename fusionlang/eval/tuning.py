"""`tune(values, on=[tasks], split="val")`: merge arguments chosen on a validation split.

A merge argument written as `tune([...], on=[...])` is a search: `fusionlang run` merges
once per candidate (every combination when one merge has several tune() arguments),
scores each result on the tasks' validation split (mean accuracy) and keeps the best,
before the real plan is compiled and run. The test split is never looked at, so the
accuracies an `eval` reports stay honest. Merges are tuned in dependency order: a merge
built from a tuned merge sees its chosen value.

`check` and `compile` need no data: they verify every candidate (each one is lowered at a
probe tensor) and plan the first candidate.

A tune() with a budget (`tune(between(0.1, 1.0), on=[...], budget=16)`) is a search
instead of a grid: `eval.search` runs it; the sites and records are `eval.tune_sites`'.
"""

from __future__ import annotations

import itertools

from .. import ir
from ..lang.diagnostics import Diagnostic, FuseErrors
from .candidates import Candidate, LocalCandidates, Scoring
from .search import is_search, search_merge, study_of
from .tune_sites import SpanKey, TuneRecord, TuneSite, find_sites, span_key, substitute

__all__ = ["SpanKey", "TuneRecord", "TuneSite", "check_candidates", "edge_notes", "find_sites", "resolve",
           "span_key", "substitute"]


def edge_notes(rec: TuneRecord) -> list[str]:
    """What the user should know about a choice: a value at the edge of its grid (the best
    may lie beyond it), or candidates that all score the same (the search chose nothing)."""
    notes = []
    averages = {round(c["average"], 12) for c in rec.candidates}
    if len(rec.candidates) > 1 and len(averages) == 1:
        notes.append(f"{rec.merge}: all {len(rec.candidates)} candidates scored the same on the '{rec.split}' split, "
                     "so the first was kept: the tasks do not tell them apart (more examples, or a wider grid)")
        return notes
    for p in rec.params:
        grid = sorted({c["values"][p] for c in rec.candidates})
        v = rec.chosen.get(p)
        if len(grid) < 2 or v is None:
            continue
        if v in (grid[0], grid[-1]):
            edge = "largest" if v == grid[-1] else "smallest"
            notes.append(f"{rec.merge}: chose {p}={v:g}, the {edge} candidate; the best value may lie beyond: "
                         "widen the grid")
    return notes


def check_candidates(prog: ir.Program) -> list[Diagnostic]:
    """Lower every candidate of every tune() at a probe tensor (no model files needed)."""
    from ..plan.lower import Lowerer
    diags: list[Diagnostic] = []
    by_merge = _by_merge(find_sites(prog))
    for sites in by_merge.values():
        if is_search(sites):
            diags += study_of(sites)[1]
            if not _has_optuna():
                diags.append(Diagnostic("E019", "a search needs optuna, which is not installed", sites[0].call.span,
                                        "pip install 'fusionlang[search]' (optuna and cmaes)"))
        for s in sites[1:]:
            if s.split != sites[0].split:
                diags.append(Diagnostic("E019", f"the tune() arguments of one merge must choose on the same split "
                                        f"('{sites[0].split}' and '{s.split}')", s.call.span,
                                        "they are searched together, as a grid, on one split"))
    for sites in by_merge.values():
        for s in sites:
            items = list(zip(ir.tune_values(prog, s.call), s.values))
            if s.range is not None:  # the middle of a range too: e.g. a fraction where an integer is needed
                items.append((items[0][0], (s.range[0] + s.range[1]) / 2))
            for item, v in items:
                try:
                    Lowerer(substitute(prog, {s.key: v}), dry=True).dry_check(merges={s.merge}, first_probe_only=True)
                except FuseErrors as e:
                    for d in e.diagnostics:
                        if d.severity == "error":
                            diags.append(Diagnostic(d.code, f"candidate {s.param}={v:g} of tune(): {d.message}",
                                                    item.span, d.hint or f"(at {d.span})"))
    return diags


def _has_optuna() -> bool:
    import importlib.util

    return importlib.util.find_spec("optuna") is not None


def _by_merge(sites: list[TuneSite]) -> dict[str, list[TuneSite]]:
    out: dict[str, list[TuneSite]] = {}
    for s in sites:
        out.setdefault(s.merge, []).append(s)
    return out


def _depends_on(prog: ir.Program, q: str, pending: set[str], seen: set[str] | None = None) -> bool:
    """Does merge `q` use (transitively) another merge that still has a tune()?"""
    seen = seen if seen is not None else set()
    b = prog.bindings[q]
    for root in (b.value, *(r.value for r in b.rules)):
        for node in ir.walk_expr(root):
            if isinstance(node, ir.Ref) and node.scope == "global" and node.name not in seen:
                seen.add(node.name)
                if node.name in pending and node.name != q:
                    return True
                if _depends_on(prog, node.name, pending, seen):
                    return True
    return False


def resolve(prog: ir.Program, run_device: str, eval_device: str, console, shard_bytes: int,
            executor: str = "local", address: str | None = None) -> tuple[ir.Program, list[TuneRecord]]:
    """Choose every tune() on its validation split; returns the program with the chosen
    values in place, and a record of every candidate's scores. The candidates are
    checked already (pipeline.compile_spec runs check_candidates first). `executor`:
    where candidates are merged and scored ("local", or "ray": Ray tasks on the cluster
    at `address`, `candidates.RayCandidates`)."""
    from .candidates import make_candidates

    by_merge = _by_merge(find_sites(prog))
    chosen: dict[SpanKey, float] = {}
    records = []
    if not by_merge:
        return prog, records
    pool = make_candidates(executor, address, gpu=eval_device == "cuda")
    try:
        while by_merge:
            pending = set(by_merge)
            q = next((m for m in by_merge if not _depends_on(prog, m, pending)), next(iter(by_merge)))
            sites = by_merge.pop(q)
            how = search_merge if is_search(sites) else _tune_merge
            records.append(how(substitute(prog, chosen), q, sites, chosen, run_device, eval_device, console,
                               shard_bytes, pool))
    finally:
        pool.close()
    return substitute(prog, chosen), records


def _tune_merge(prog: ir.Program, q: str, sites: list[TuneSite], chosen: dict, run_device: str,
                eval_device: str, console, shard_bytes: int, pool: LocalCandidates) -> TuneRecord:
    from .evaluation import resolve_task

    short = q.split("::")[-1]
    tasks = list(dict.fromkeys(t for s in sites for t in s.tasks))
    split = sites[0].split
    task_args = {t.split("::")[-1]: resolve_task(prog, t) for t in tasks}
    rec = TuneRecord(short, split, list(task_args), [s.param for s in sites])
    grid = list(itertools.product(*(s.values for s in sites)))
    console.print(f"tuning [bold]{short}[/]: {len(grid)} candidate{'s' * (len(grid) != 1)} "
                  f"on the '{split}' split of {', '.join(rec.tasks)}{pool.where}")
    from ..zoo.progress import Heartbeat, stderr_writer

    beat = Heartbeat(stderr_writer(console), f"tuning {short}", "candidates")
    points = [({s.key: v for s, v in zip(sites, combo)}, {s.param: v for s, v in zip(sites, combo)}) for combo in grid]
    labels = [", ".join(f"{k}={v:g}" for k, v in shown.items()) for _, shown in points]
    # a long candidate shows its merge and its evaluation batches (throttled lines);
    # its scores are cached like a search's (eval.candidates.candidate_key)
    cands = [Candidate(substitute(prog, values), q, shown,
                       lambda what, i=i: beat.beat(i, len(grid), f"{labels[i]}: {what}"))
             for i, (values, shown) in enumerate(points)]
    best = None
    reused = 0
    # NOTE: the candidates in grid order, whatever order they finished in: the same choice on ties
    results = pool.scores(cands, Scoring(task_args, split, run_device, eval_device, shard_bytes))
    for i, ((values, shown), (scores, cached)) in enumerate(zip(points, results)):
        reused += cached
        acc = {name: s["accuracy"] for name, s in scores.items()}
        avg = sum(acc.values()) / len(acc)
        rec.candidates.append({"values": shown, "accuracy": acc, "average": avg})
        beat.last = float("-inf")  # every finished candidate gets its line
        beat.beat(i + 1, len(grid), f"{labels[i]}  ->  {100 * avg:.1f}  ("
                  + ", ".join(f"{k} {100 * x:.1f}" for k, x in acc.items()) + ")" + ("  (cached)" * cached))
        if best is None or avg > best[0]:
            best = (avg, values, shown)
    if reused:
        console.print(f"  {len(grid) - reused} merged and evaluated, {reused} reused from the cache")
    chosen.update(best[1])
    rec.chosen = best[2]
    console.print(f"  chosen: [bold]{', '.join(f'{k}={v:g}' for k, v in rec.chosen.items())}[/] "
                  f"(mean {split} accuracy {100 * best[0]:.1f})")
    rec.notes = edge_notes(rec)
    for n in rec.notes:
        console.print(f"  note: {n}", markup=False, highlight=False, soft_wrap=True)
    return rec
