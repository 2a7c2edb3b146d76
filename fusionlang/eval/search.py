"""A search over merge arguments on a budget of evaluations: `tune(..., budget=N)`.

    merge ta = task_arithmetic(base, experts,
        scale=tune(between(0.1, 1.0), on=[austen, pos], budget=16, sampler="tpe", seed=0))
    merge tt = ties(base, experts,
        density=tune(between(0.1, 0.9), on=[austen, pos], budget=24, sampler="gp",
                     objectives=["accuracy", "loss"], pick="accuracy"),
        scale=tune(between(0.2, 1.5), on=[austen, pos]))

The tune()s of one merge form one optuna study (a `between(low, high, log)` range is a
`suggest_float`, a list a `suggest_categorical`); a setting given on one tune() applies to
the whole merge. Each trial merges the candidate, scores it on the tasks' validation
split and tells optuna its objectives: `accuracy` (mean validation accuracy, maximised)
and `loss` (mean validation loss, minimised; cross-entropy per example for classification
tasks, per token for perplexity() tasks). Several objectives give a Pareto front (as
"Model Fusion through Bayesian Optimization in Language Model Fine-Tuning", Jang et al.
2024, optimises loss and metric together); `pick` names the objective that chooses the
saved point on it. Samplers: optuna's TPE and GP (Bayesian optimisation), CMA-ES (as
mergekit-evolve), NSGA-II (as mergenetic), random. The first STARTUP_TRIALS trials of TPE
and GP are random (optuna's n_startup_trials, lowered from 10 for the small budgets that
merging affords) and NSGA-II's population is NSGA2_POPULATION: neither depends on the
budget, so a larger budget begins with exactly the trials of a smaller one.

Reproducible: a seed (default 0) fixes the sampler, and evaluation is deterministic, so a
rerun proposes the same candidates; each candidate's scores are cached on disk under a
content hash (`candidate_key`: the lowered merge, its input files' digests, the tasks,
the split and the device type), so a rerun, or a larger budget (its first trials are the
smaller budget's), merges and evaluates only the candidates it has not seen.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

from .. import ir
from ..lang.diagnostics import Diagnostic
from ..lang.search_args import OBJECTIVES, SAMPLERS
from .candidates import Candidate, LocalCandidates, Scoring, cache_root
from .tune_sites import TuneRecord, TuneSite, substitute


@dataclass
class Study:
    """The search settings of one merge (its tune()s' settings combined)."""

    budget: int
    sampler: str = "tpe"
    seed: int = 0
    objectives: tuple[str, ...] = ("accuracy",)
    pick: str = "accuracy"

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o][0] for o in self.objectives]


def is_search(sites: list[TuneSite]) -> bool:
    """Whether a merge's tune()s are a search (a range, or a setting such as budget=) rather than a grid."""
    return any(s.range is not None or s.settings for s in sites)


def study_of(sites: list[TuneSite]) -> tuple[Study | None, list[Diagnostic]]:
    """The merge's study, and E019s where its tune()s disagree on a setting or the
    settings do not make a search (no budget; several objectives and no pick; CMA-ES on
    one dimension, a list, or several objectives)."""
    diags: list[Diagnostic] = []
    given: dict[str, tuple] = {}
    for s in sites:
        for k, (v, span) in s.settings.items():
            if k in given and given[k][0] != v:
                diags.append(Diagnostic("E019", f"the tune()s of merge '{s.merge.split('::')[-1]}' are one search, "
                                        f"and they give {k}={_show(given[k][0])} and {k}={_show(v)}", span,
                                        f"give {k}= once (it applies to every tune() of the merge), or the same value"))
            given.setdefault(k, (v, span))
    if "budget" not in given:
        ranged = next((s for s in sites if s.range is not None), None)
        if ranged is not None:
            diags.append(Diagnostic("E019", "a search range needs a budget of evaluations", ranged.call.span,
                                    "add budget= to one tune() of the merge, e.g. "
                                    "tune(between(0.1, 1.0), on=[task1], budget=16)"))
        else:
            k, (_v, span) = next(iter(given.items()))
            diags.append(Diagnostic("E019", f"{k}= belongs to a search, which needs a budget of evaluations", span,
                                    "add budget=N for a search (sampler, seed, objectives and pick apply to it), "
                                    f"or drop {k}= for the grid, which tries every candidate"))
        return None, diags
    objectives = tuple(given.get("objectives", (["accuracy"],))[0])
    study = Study(int(given["budget"][0]), given.get("sampler", ("tpe",))[0], int(given.get("seed", (0,))[0]),
                  objectives, given.get("pick", (objectives[0],))[0])
    if len(objectives) > 1 and "pick" not in given:
        diags.append(Diagnostic("E019", f"a search on {len(objectives)} objectives finds a Pareto front: say which "
                                "objective picks the saved model", given["objectives"][1],
                                f'add pick="{objectives[0]}" (the front\'s best point by that objective)'))
    elif study.pick not in objectives:
        diags.append(Diagnostic("E019", f"pick='{study.pick}' is not among the objectives ({', '.join(objectives)})",
                                given["pick"][1], f"pick one of {', '.join(objectives)}"))
    if study.sampler == "cmaes":
        at = given["sampler"][1]
        if len(objectives) > 1:
            diags.append(Diagnostic("E019", "CMA-ES optimises one objective", at,
                                    'use sampler="tpe", "gp", "nsga2" or "random" for several objectives'))
        listed = next((s for s in sites if s.range is None), None)
        if listed is not None:
            diags.append(Diagnostic("E019", "CMA-ES searches continuous ranges, and this tune() lists candidates",
                                    listed.call.span, "write between(low, high), or use sampler=\"tpe\" for a list"))
        elif len(sites) < 2:
            diags.append(Diagnostic("E019", "CMA-ES needs two or more searched values (optuna falls back to "
                                    "random search on one)", at,
                                    'use sampler="tpe" or "gp" for one value, or search more (e.g. one value per '
                                    "layer group: scale=[tune(between(...), ...), tune(between(...), ...)])"))
    return study, diags


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (str, list)) else f"{v:g}"


STARTUP_TRIALS = 5  # random trials before TPE or GP model the objective (optuna's default: 10)
NSGA2_POPULATION = 8  # NSGA-II's population (optuna's default: 50)


def make_sampler(study: Study):
    """The optuna sampler a study names, seeded."""
    import optuna

    s = study.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s == "tpe":
            return optuna.samplers.TPESampler(seed=study.seed, n_startup_trials=STARTUP_TRIALS)
        if s == "gp":
            return optuna.samplers.GPSampler(seed=study.seed, n_startup_trials=STARTUP_TRIALS,
                                             deterministic_objective=True)
        if s == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=study.seed)
        if s == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=study.seed, population_size=NSGA2_POPULATION)
        if s == "random":
            return optuna.samplers.RandomSampler(seed=study.seed)
    raise AssertionError(s)  # the checker knows SAMPLERS


def pareto_front(points: list[list[float]], directions: list[str]) -> list[int]:
    """Indices of the non-dominated points (each a list of objective values; `directions`
    "maximize"/"minimize" per objective), in their order. A point dominates another when
    it is at least as good in every objective and better in one; equal points are all kept."""
    sign = [1.0 if d == "minimize" else -1.0 for d in directions]
    keys = [[s * v for s, v in zip(sign, p)] for p in points]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [i for i, p in enumerate(keys) if not any(dominates(q, p) for j, q in enumerate(keys) if j != i)]


def choose(trials: list[dict], study: Study) -> int:
    """Index of the chosen trial: on the Pareto front, the best by `pick`, then by the
    other objectives in their order, then the earliest."""
    front = [i for i, t in enumerate(trials) if t["pareto"]]
    order = [study.pick, *(o for o in study.objectives if o != study.pick)]

    def key(i):
        vals = trials[i]["objectives"]
        return tuple(-vals[o] if OBJECTIVES[o][0] == "maximize" else vals[o] for o in order) + (i,)

    return min(front, key=key)


# -- running a search
def search_merge(prog: ir.Program, q: str, sites: list[TuneSite], chosen: dict, run_device: str, eval_device: str,
                 console, shard_bytes: int, pool: LocalCandidates) -> TuneRecord:
    """Search merge `q`'s tune()s on its study's budget; sets the chosen values in `chosen`
    and returns the record (every trial, the Pareto front, the choice); `pool` merges and
    scores the candidates (`candidates.make_candidates`). Progress: a line per
    finished trial on stderr (also when it is not a terminal), throttled lines in between."""
    import optuna

    from ..zoo.progress import Heartbeat, stderr_writer
    from .evaluation import resolve_task

    study, _diags = study_of(sites)  # checked before the run (tuning.check_candidates)
    short = q.split("::")[-1]
    tasks = list(dict.fromkeys(t for s in sites for t in s.tasks))
    split = sites[0].split
    task_args = {t.split("::")[-1]: resolve_task(prog, t) for t in tasks}
    rec = TuneRecord(short, split, list(task_args), [s.param for s in sites])
    rec.search = {"sampler": study.sampler, "budget": study.budget, "seed": study.seed,
                  "objectives": list(study.objectives), "pick": study.pick,
                  "ranges": {s.param: ({"low": s.range[0], "high": s.range[1], "log": s.range[2]} if s.range
                                       else {"choices": s.values}) for s in sites}}
    console.print(f"searching [bold]{short}[/]: {study.budget} trial{'s' * (study.budget != 1)} "
                  f"({SAMPLERS[study.sampler].split(' (')[0]}, seed {study.seed}) on the '{split}' split of "
                  f"{', '.join(rec.tasks)}; objectives: {', '.join(study.objectives)}{pool.where}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opt = optuna.create_study(directions=study.directions, sampler=make_sampler(study))
    beat = Heartbeat(stderr_writer(console), f"searching {short}", "trials")
    how = Scoring(task_args, split, run_device, eval_device, shard_bytes)
    evaluated = reused = 0
    # NOTE: a pool that scores k candidates at once (Ray) gets k trials asked before their
    # scores are told: the sampler sees the same history for a given k and seed
    i = 0
    while i < study.budget:
        batch = []
        for j in range(i, min(study.budget, i + pool.parallel)):
            trial = opt.ask()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. a categorical of floats
                shown = {s.param: (trial.suggest_float(s.param, s.range[0], s.range[1], log=s.range[2])
                                   if s.range else trial.suggest_categorical(s.param, s.values)) for s in sites}
            label = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
            values = {s.key: float(shown[s.param]) for s in sites}
            batch.append((trial, shown, label, Candidate(
                substitute(prog, values), q, shown,
                lambda what, j=j, label=label: beat.beat(j, study.budget, f"{label}: {what}"))))
        results = pool.scores([c for *_, c in batch], how)
        for (trial, shown, label, _c), (scores, was_cached) in zip(batch, results):
            evaluated += not was_cached
            reused += was_cached
            objs = _objectives(scores, study.objectives)
            opt.tell(trial, [objs[o] for o in study.objectives])
            row = {"trial": i, "values": shown, "objectives": objs, "reused": was_cached}
            for metric in ("accuracy", "loss"):
                per = {t: s[metric] for t, s in scores.items() if metric in s}
                if per:
                    row[metric] = per
            if "accuracy" in row:
                row["average"] = sum(row["accuracy"].values()) / len(row["accuracy"])
            rec.candidates.append(row)
            i += 1
            beat.last = float("-inf")  # every finished trial gets its line
            beat.beat(i, study.budget, f"{label}  ->  {_fmt(objs)}" + ("  (cached)" if was_cached else ""))
    front = pareto_front([[t["objectives"][o] for o in study.objectives] for t in rec.candidates],
                         study.directions)
    for j, t in enumerate(rec.candidates):
        t["pareto"] = j in front
    best = choose(rec.candidates, study)
    rec.chosen = dict(rec.candidates[best]["values"])
    chosen.update({s.key: float(rec.chosen[s.param]) for s in sites})
    rec.search |= {"evaluated": evaluated, "reused": reused, "chosen_trial": best,
                   "pareto_front": front if len(study.objectives) > 1 else [best]}
    console.print(f"  searched {study.budget} trials: {evaluated} merged and evaluated, {reused} reused from the "
                  f"cache ({cache_root()})")
    console.print(f"  chosen: [bold]{', '.join(f'{k}={v:.6g}' for k, v in rec.chosen.items())}[/] "
                  f"(trial {best}: {_fmt(rec.candidates[best]['objectives'])}"
                  + (f"; best {study.pick} on the Pareto front of {len(front)}" if len(study.objectives) > 1 else "")
                  + ")")
    rec.notes = search_notes(rec, sites)
    for n in rec.notes:
        console.print(f"  note: {n}", markup=False, highlight=False, soft_wrap=True)
    return rec


def _fmt(objs: dict) -> str:
    return ", ".join(f"{k} {100 * v:.1f}" if k == "accuracy" else f"{k} {v:.4f}" for k, v in objs.items())


def _objectives(scores: dict, objectives) -> dict[str, float]:
    """Each objective: the mean over tasks of the task's metric of that name."""
    return {o: sum(s[o] for s in scores.values()) / len(scores) for o in objectives}


def search_notes(rec: TuneRecord, sites: list[TuneSite]) -> list[str]:
    """What the user should know about a search's choice: a value within 1 % of its
    range's end (the best may lie beyond), or trials that all scored the same."""
    notes = []
    objs = {json.dumps(t["objectives"], sort_keys=True) for t in rec.candidates}
    if len(rec.candidates) > 1 and len(objs) == 1:
        notes.append(f"{rec.merge}: all {len(rec.candidates)} trials scored the same on the '{rec.split}' split: "
                     "the tasks do not tell the candidates apart (more examples, or a wider range)")
        return notes
    for s in sites:
        v = rec.chosen.get(s.param)
        if v is None:
            continue
        if s.range is not None:
            lo, hi, log = s.range
            f = (lambda x: math.log(x)) if log else (lambda x: x)
            at = (f(v) - f(lo)) / (f(hi) - f(lo))
            if at <= 0.01 or at >= 0.99:
                end = "high" if at >= 0.99 else "low"
                notes.append(f"{rec.merge}: chose {s.param}={v:.4g}, at the {end} end of between({lo:g}, {hi:g}); "
                             "the best value may lie beyond: widen the range")
        elif len(s.values) > 1 and v in (min(s.values), max(s.values)):
            edge = "largest" if v == max(s.values) else "smallest"
            notes.append(f"{rec.merge}: chose {s.param}={v:g}, the {edge} candidate; the best value may lie "
                         "beyond: widen the list")
    return notes
