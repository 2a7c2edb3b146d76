"""Checks of a searched tune()'s arguments: `between(low, high, log=false)` ranges, the
search settings (budget, sampler, seed, objectives, pick). No torch, no optuna.

    tune(between(0.1, 1.0), on=[a, b], budget=16, sampler="tpe", seed=0,
         objectives=["accuracy", "loss"], pick="accuracy")

The names follow optuna (`suggest_float(low, high, log=...)`, its samplers' names) and
mergekit-evolve (CMA-ES on a budget of evaluations). Every misuse is an E019 at the
argument that is wrong. The checks that need the whole merge (several tune()s agreeing,
CMA-ES's dimensions) are in `eval.tuning.check_candidates`; those that need the tasks
(a loss on a task without one) in `pipeline._check_tasks`.
"""

from __future__ import annotations

import difflib

from .. import ir
from .diagnostics import DiagnosticSink

# optuna samplers by the name a spec gives them
SAMPLERS = {
    "tpe": "optuna's TPESampler (Bayesian optimisation with tree-structured Parzen estimators)",
    "gp": "optuna's GPSampler (Bayesian optimisation with a Gaussian process)",
    "cmaes": "optuna's CmaEsSampler (CMA-ES, as mergekit-evolve; continuous ranges, two or more of them)",
    "random": "optuna's RandomSampler (uniform random search: a baseline)",
    "nsga2": "optuna's NSGAIISampler (the multi-objective evolutionary search mergenetic uses)",
}
# objective name -> (optuna direction, what it is)
OBJECTIVES = {
    "accuracy": ("maximize", "mean accuracy over the tasks' validation split"),
    "loss": ("minimize", ("mean validation loss over the tasks: cross-entropy per example for a classification "
                          "task, per token for a perplexity() task")),
}
SEARCH_SETTINGS = ("budget", "sampler", "seed", "objectives", "pick")
MAX_BUDGET = 100_000


def _near(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def check_between(sink: DiagnosticSink, call: ir.CallE, folded) -> None:
    """between(low, high, log=false): finite numbers, low < high; a log scale needs low > 0."""
    a = dict(zip(("low", "high", "log"), call.args)) | dict(call.kwargs)
    low, high = (folded(a[k]) if k in a else None for k in ("low", "high"))
    if low is None or high is None:
        for k in ("low", "high"):
            if k in a and folded(a[k]) is None and a[k].type in ("number", "int"):
                sink.error("E019", f"between() needs a literal number for {k}", a[k].span,
                           "e.g. between(0.1, 1.0): the search range is fixed when the spec is compiled")
        return
    if not low < high:
        sink.error("E019", f"between({low:g}, {high:g}) is empty: low must be less than high", call.span,
                   f"e.g. between({min(low, high):g}, {max(low, high):g}); for a single value write the number itself")
        return
    log = a.get("log")
    if isinstance(log, ir.Const) and log.value is True and low <= 0:
        sink.error("E019", f"between({low:g}, {high:g}, log=true) samples log(x), so low must be positive", call.span,
                   "give a positive low, e.g. between(0.01, 1.0, log=true), or drop log=true")


def check_search(sink: DiagnosticSink, bound: dict[str, ir.Expr], folded) -> None:
    """The search settings of one tune() (`bound`: its arguments by name): a budget of at
    least 1, a known sampler, a seed in optuna's range, known objectives listed once. What
    needs the merge's other tune()s (a budget somewhere, pick among the objectives, CMA-ES's
    limits) is `eval.search.study_of`'s."""
    for k in SEARCH_SETTINGS:
        e = bound.get(k)
        literal = isinstance(e, ir.ListE) if k == "objectives" else (
            isinstance(e, ir.Const) or (isinstance(e, ir.Neg) and isinstance(e.operand, ir.Const)))
        if e is not None and e.type not in ("none", "any") and not literal:
            sink.error("E019", f"{k}= needs a literal value", e.span,
                       "the search is fixed when the spec is compiled: write the value itself, e.g. budget=16, "
                       'sampler="tpe", seed=0, objectives=["accuracy", "loss"], pick="accuracy"')
            return
    budget = bound.get("budget")
    if budget is not None and budget.type != "none":
        n = folded(budget)
        if n is not None and (n != int(n) or n < 1 or n > MAX_BUDGET):
            sink.error("E019", f"budget={n:g} must be a whole number of evaluations from 1 to {MAX_BUDGET}",
                       budget.span, "e.g. budget=16")
    sampler = bound.get("sampler")
    if isinstance(sampler, ir.Const) and isinstance(sampler.value, str) and sampler.value not in SAMPLERS:
        sink.error("E019", f"unknown sampler '{sampler.value}'", sampler.span,
                   f"{_near(sampler.value, SAMPLERS)}samplers: {', '.join(SAMPLERS)}")
    seed = bound.get("seed")
    if seed is not None and folded(seed) is not None and (folded(seed) < 0 or folded(seed) >= 2**32):
        sink.error("E019", f"seed={folded(seed):g} must be from 0 to 2**32 - 1", seed.span, "e.g. seed=0")
    _objectives(sink, bound.get("objectives"))


def _objectives(sink: DiagnosticSink, e: ir.Expr | None) -> list[str] | None:
    """The objective names of objectives=[...] (None when absent or not literal)."""
    if e is None or e.type == "none":
        return ["accuracy"]
    if not (isinstance(e, ir.ListE) and e.items and all(isinstance(i, ir.Const) and isinstance(i.value, str)
                                                        for i in e.items)):
        sink.error("E019", "objectives= needs a literal list of objective names", e.span,
                   f'e.g. objectives=["accuracy", "loss"]; objectives: {", ".join(OBJECTIVES)}')
        return None
    names = [i.value for i in e.items]
    ok = True
    for i in e.items:
        if i.value not in OBJECTIVES:
            ok = False
            sink.error("E019", f"unknown objective '{i.value}'", i.span,
                       f"{_near(i.value, OBJECTIVES)}objectives: "
                       + "; ".join(f"{k} ({v[0]}: {v[1]})" for k, v in OBJECTIVES.items()))
    if len(set(names)) != len(names):
        sink.error("E019", "objectives= lists an objective twice", e.span, "list each objective once")
        ok = False
    return names if ok else None
