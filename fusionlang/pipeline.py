"""The compiler driver: spec file -> checked IR -> plan -> optimized plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import ir
from .lang.checker import check_file
from .lang.diagnostics import Diagnostic, FuseErrors, Span
from .plan.graph import Plan
from .plan.lower import Lowerer

MISSING_MODEL_CODES = {"E010", "E017", "E018"}


@dataclass
class CheckResult:
    file: str
    diagnostics: list[Diagnostic] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # what could not be checked without models

    @property
    def ok(self) -> bool:
        return not any(d.severity == "error" for d in self.diagnostics)


def check(path: str) -> CheckResult:
    """Everything `fusionlang check` verifies: syntax, names, types, signatures, argument
    values; and, when the model files are present, tensor names, shapes and patterns."""
    res = CheckResult(path)
    try:
        prog = check_file(path)
    except FuseErrors as e:
        res.diagnostics = e.diagnostics
        if e.partial is not None:
            res.diagnostics += [d for d in _dry_check_partial(e.partial) if d not in res.diagnostics]
        return res
    from .eval.tuning import check_candidates, find_sites

    first = list(prog.warnings) + check_candidates(prog)  # reported before what lowering finds
    # lowering sees each tune() as its first candidate: check_candidates reports that one already
    tune_spans = {s.call.span for s in find_sites(prog)}

    def with_first(diags: list[Diagnostic]) -> list[Diagnostic]:
        return first + [d for d in diags if d not in first and d.span not in tune_spans]

    low = Lowerer(prog)
    try:
        _check_tasks(prog)
        low.lower()
        if prog.evals:
            from .eval.evaluation import check_fit

            check_fit(prog)
        res.diagnostics = with_first(low.sink.items)
        return res
    except FuseErrors as e:
        missing = [d for d in e.diagnostics if d.code in MISSING_MODEL_CODES]
        others = [d for d in e.diagnostics if d.code not in MISSING_MODEL_CODES]
        if not missing:
            res.diagnostics = with_first(e.diagnostics)
            return res
    # Lowering stops at the first source it cannot read: list every absent model, and
    # report every broken one.
    for d in low.check_sources():
        if d.code in MISSING_MODEL_CODES:
            if all(m.span != d.span for m in missing):
                missing.append(d)
        elif d not in others:
            others.append(d)
    missing.sort(key=lambda d: (d.span.file, d.span.line, d.span.col))
    # Models are absent: check argument values by evaluating at a probe tensor instead.
    try:
        Lowerer(prog, dry=True).dry_check()
    except FuseErrors as e:
        others += [d for d in e.diagnostics if d not in others]
    # The save-path rules that need no model: specs, other saves, symlinks, foreign
    # directories (and the inputs that are present)
    paths = Lowerer(prog)
    paths.check_sources()
    paths.check_output_paths()
    others += [d for d in paths.sink.items if d.code == "E016" and d not in others]
    res.diagnostics = with_first(others)
    for d in missing:
        res.unverified.append(f"{d.span}: {d.message}" + (f" (hint: {d.hint})" if d.hint else ""))
    return res


def _dry_check_partial(partial: ir.Program) -> list[Diagnostic]:
    """Argument-value errors of the merges that checked cleanly in a file with errors."""
    try:
        Lowerer(partial, dry=True).dry_check(partial=True)
    except FuseErrors as dry:
        return [d for d in dry.diagnostics if d.severity == "error"]
    except Exception:  # noqa: BLE001
        # NOTE: best effort on a program with errors (those are reported already): a
        # failure here must not hide them behind an internal error
        return []
    return []


def _check_tasks(prog: ir.Program) -> None:
    """Every task names a task of a built zoo (E018 when the zoo is not built)."""
    if not any(b.kind == "task" for b in prog.bindings.values()):
        return
    from .eval.evaluation import resolve_task
    from .eval.tuning import find_sites

    diags = []
    kinds = {}
    for q, b in prog.bindings.items():
        if b.kind == "task":
            try:
                kinds[q] = resolve_task(prog, q).get("kind")
            except FuseErrors as e:
                diags += e.diagnostics
    for site in find_sites(prog):
        # NOTE: at the objectives, else the tasks: `check` leaves out what lowering says at a
        # tune() itself (it sees each tune() as its first candidate)
        objectives, at = site.settings.get("objectives", (None, ir.tune_args(site.call)["on"].span))
        for t in site.tasks:
            kind = kinds.get(t)
            if kind == "perplexity" and (objectives is None or "accuracy" in objectives):
                diags.append(Diagnostic("E019", f"tune() chooses by accuracy, and '{t.split('::')[-1]}' is a "
                                        "perplexity() task", at,
                                        "choose on classification tasks (classify() or accuracy()), or search "
                                        'objectives=["loss"] with budget='))
            if kind == "lm_eval":
                diags.append(Diagnostic("E019", f"tune() chooses by accuracy or loss, and '{t.split('::')[-1]}' is "
                                        "an lm_eval() task, which reports its own metric", at,
                                        "choose on classify(), accuracy(), exact_match() or perplexity() tasks"))
            elif kind == "exact_match" and objectives is not None and "loss" in objectives:
                diags.append(Diagnostic("E019", f"the objective 'loss' needs a loss, and '{t.split('::')[-1]}' is "
                                        f"an {kind}() task, which has none", at,
                                        "search loss on classify(), accuracy() or perplexity() tasks, or "
                                        'objectives=["accuracy"]'))
    if diags:
        raise FuseErrors(diags)


def compile_spec(path: str, passes: set[str] | None = None, dump_after: str | None = None,
                 verify: bool = False, on_dump: Callable[[str, Plan], None] | None = None,
                 tuner: Callable[[ir.Program], tuple[ir.Program, list]] | None = None) -> tuple[ir.Program, Plan, Plan]:
    """Check and lower a spec (models required); returns (program, lowered plan, optimized plan).
    Merges that an `eval` needs but no `save` writes get outputs in a temporary directory;
    the evaluation setup travels as `plan.eval_setup`. `tuner` chooses the tune() arguments
    (`run`); without it the plan holds each tune()'s first candidate (`compile`)."""
    from .eval.evaluation import prepare
    from .eval.tuning import check_candidates
    from .passes import run_passes

    checked = check_file(path)
    _check_tasks(checked)  # every task error at once, before anything runs
    if checked.evals:
        from .eval.evaluation import check_fit

        check_fit(checked)  # before tune() merges and evaluates anything
    tune_errors = check_candidates(checked)
    if tune_errors:
        raise FuseErrors(tune_errors)
    tuning: list = []
    if tuner is not None:
        checked, tuning = tuner(checked)
    setup = prepare(checked)
    setup.tuning = tuning
    prog = setup.program
    low = Lowerer(prog)
    lowered = low.lower()
    found = tuple(d for d in low.sink.items if d.severity == "warning" and d not in prog.warnings)
    if found:  # warnings of lowering (e.g. a MoE's expert count), shown with the checker's
        prog = prog.model_copy(update={"warnings": tuple(prog.warnings) + found})
    if not prog.saves and not prog.evals and not prog.ensemble_saves:
        raise FuseErrors([Diagnostic("E015", "the spec saves nothing, so there is nothing to run", Span(path, 1, 1),
                                     'add `save NAME to "dir"` for the merge you want written')])
    optimized = run_passes(lowered, passes, dump_after, verify, on_dump)
    optimized.eval_setup = setup
    return prog, lowered, optimized


def estimate_peak_bytes(plan: Plan) -> int:
    """Peak bytes of live values, simulating the executor's order and frees (fp32
    intermediates, no credit for in-place ops: an upper bound per tensor group)."""
    order = plan.order or plan.topo_order()
    by_group: dict[str, list[str]] = {}
    for nid in order:
        by_group.setdefault(plan.nodes[nid].group, []).append(nid)
    return max((plan.peak_bytes(nodes) for group, nodes in by_group.items() if group), default=0)


def load_plan(path: str) -> Plan:
    """A plan saved by `fusionlang compile --emit json`, validated and checked against the
    model files it names (`run PLAN.json`). Raises FuseErrors located at the plan file:
    E008 when it is not a valid plan, E010/E011/E014 when its inputs changed."""
    from .plan import emit

    try:
        with open(path, encoding="utf-8") as f:
            plan = emit.from_json(f.read())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FuseErrors([Diagnostic("E008", f"cannot load plan '{path}': {e}", Span(path, 1, 1),
                                     "pass a .fuse spec or a plan written by `fusionlang compile --emit json`")]) from None
    verify_plan_inputs(plan, path)
    return plan


def verify_plan_inputs(plan: Plan, path: str) -> None:
    """A saved plan names input files and their headers: make sure they still match
    (FuseErrors located at the plan file: E010/E011/E014 as reading the model says)."""
    import os

    from .runtime.sources import SourceError, read_model_dir

    diags = []
    for k, s in plan.sources.items():
        if s.stage:  # a stage's result: computed (or found in the cache) when the plan runs
            continue
        try:
            h = read_model_dir(s.path)
        except SourceError as e:
            diags.append(Diagnostic(e.code, f"source '{k}': {e.message}", Span(path, 1, 1), e.hint))
            continue
        for t, (dtype, shape, file) in s.tensors.items():
            info = h.tensors.get(t)
            if info is None or info.dtype != dtype or info.shape != tuple(shape):
                diags.append(Diagnostic("E014", f"source '{k}' changed since the plan was compiled (tensor '{t}')",
                                        Span(path, 1, 1), "re-run `fusionlang compile`"))
                break
            if file and os.path.abspath(os.path.join(s.path, file)) != os.path.abspath(info.file):
                diags.append(Diagnostic(
                    "E011", f"source '{k}' was re-sharded since the plan was compiled: tensor '{t}' is now in "
                    f"'{os.path.basename(info.file)}', the plan reads '{os.path.basename(file)}'",
                    Span(path, 1, 1), "re-run `fusionlang compile SPEC --emit json -o PLAN`"))
                break
    if diags:
        raise FuseErrors(diags)


def remove_eval_tmpdir(plan) -> None:
    """Remove the temporary directory `evaluation.prepare` named for unsaved evaluated
    merges (the evaluations remove it when they run; compile, and a failed or
    interrupted run, call this)."""
    import shutil

    setup = getattr(plan, "eval_setup", None)
    if setup is not None and setup.tmpdir:
        shutil.rmtree(setup.tmpdir, ignore_errors=True)


def make_tuner(device: str, console, shard_bytes: int, executor: str = "local",
               address: str | None = None) -> Callable[[ir.Program], tuple[ir.Program, list]]:
    """The `tuner` of compile_spec for a run: each tune() chosen on its validation split,
    merging candidates on `device` and evaluating them on the same device type, here or
    as Ray tasks (`executor="ray"`, the cluster at `address`)."""
    from .eval.tuning import resolve
    from .runtime.reader import pick_device

    def tuner(prog: ir.Program):
        return resolve(prog, device, pick_device(device).type, console, shard_bytes, executor, address)

    return tuner
