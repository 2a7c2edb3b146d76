"""`eval MODELS on TASKS`: evaluate merged models on zoo tasks and report.

Each evaluated model is scored on each task (accuracy with the task's frozen head), next
to two reference rows, as FusionBench reports: the pre-trained model, and the
individually fine-tuned expert of each task. For every evaluated model the report adds
normalized accuracy (accuracy / fine-tuned accuracy, per task) and forgetting versus the
pre-trained model (MergeBench's view: mean over tasks of max(0, pretrained - model)),
plus latency per batch and peak memory. Output: a rich table, `report.json`, `report.png`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import ir
from ..lang.diagnostics import Diagnostic, FuseErrors
from .sources import call_args, source_model_dir, source_name


@dataclass
class EvalSetup:
    program: ir.Program  # with implicit outputs for evaluated merges that are not saved
    models: dict[str, str] = field(default_factory=dict)  # row name -> model directory
    tasks: dict[str, dict] = field(default_factory=dict)  # task name -> classify() arguments
    tmpdir: str | None = None
    reports: list[tuple[list[str], list[str], str]] = field(default_factory=list)  # rows, tasks, report dir
    tuning: list = field(default_factory=list)  # tuning.TuneRecord of every tune() chosen before the run
    ensembles: dict[str, dict] = field(default_factory=dict)  # row name -> {"members": [{name, path}], weights, ...}
    ensemble_saves: list[tuple[str, dict]] = field(default_factory=list)  # (output dir, manifest) to write
    learned: dict[str, list] = field(default_factory=dict)  # merge name -> what its model stages learned




def resolve_task(prog: ir.Program, qual: str) -> dict:
    """A task binding's arguments: classify()'s, with the zoo task located (`kind`
    "zoo"), or accuracy()/perplexity()'s on the user's data, checked (`kind` the
    builtin's name, `data` the data value's description). FuseErrors if not."""
    from ..zoo.errors import ZooError
    from ..zoo.evaluate import find_task

    b = prog.bindings[qual]
    args = call_args(prog, b.value) if isinstance(b.value, ir.CallE) else {}
    if isinstance(b.value, ir.CallE) and b.value.target in ("accuracy", "perplexity", "exact_match"):
        return _user_task(b, args)
    if isinstance(b.value, ir.CallE) and b.value.target == "lm_eval":
        return _lm_eval_task(b, args)
    zoo = args.get("zoo", "text")
    try:
        spec = find_task(args["task"], zoo)
    except ZooError as e:
        from ..zoo.paths import zoo_dir

        try:
            built = (zoo_dir(zoo) / "zoo.json").is_file()
        except (ZooError, OSError, ValueError):
            built = False
        # NOTE: E018 (zoo not built) is "not verified" for `check`; a task missing from a
        # built zoo is a plain error.
        code = "E006" if built else "E018"
        hint = e.hint or ""
        if built:
            have = sorted(p.stem for p in (zoo_dir(zoo) / "heads").glob("*.json"))
            hint = f"tasks of the '{zoo}' zoo: {', '.join(have)}"
        raise FuseErrors([Diagnostic(code, e.message, b.value.span, hint)]) from None
    exprs = dict(zip(("task", "zoo", "split", "batch_size", "limit"), b.value.args)) | dict(b.value.kwargs) \
        if isinstance(b.value, ir.CallE) else {}
    bad = []
    for name, lo in (("batch_size", 1), ("limit", 1)):
        v = args.get(name)
        whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
        if v is not None and (isinstance(v, bool) or not whole or v < lo):
            at = exprs[name].span if name in exprs else b.value.span
            bad.append(Diagnostic("E006", f"{name}={v!r} must be a whole number of at least {lo}", at,
                                  "leave limit out to use the whole split" if name == "limit"
                                  else "a batch of e.g. 64 examples"))
    if bad:
        raise FuseErrors(bad)
    return {**args, "kind": "zoo", "spec": spec, "span": b.span}


def _user_task(b: ir.Binding, args: dict) -> dict:
    from ..plan.stage_values import DataV
    from ..stages import data as D

    data, call = args.get("data"), b.value
    if not isinstance(data, DataV):
        raise FuseErrors([Diagnostic("E005", f"{call.target}() takes one data value", call.span,
                                     'e.g. task mine = accuracy(dataset("test.jsonl", text="text", label="label"))')])
    bs = args.get("batch_size")
    if bs is not None and (isinstance(bs, bool) or float(bs) != int(bs) or bs < 1):
        raise FuseErrors([Diagnostic("E006", f"batch_size={bs!r} must be a whole number of at least 1", call.span,
                                     "e.g. batch_size=32")])
    try:
        ex = D.load(data.spec)
    except D.DataError as e:
        raise FuseErrors([Diagnostic(e.code, e.message, data.span_of(e.arg), e.hint)]) from None
    if call.target == "accuracy" and ex.labels is None:
        raise FuseErrors([Diagnostic("E006", "accuracy() needs labeled data: name the label column with label=",
                                     data.span, 'e.g. dataset("test.jsonl", text="text", label="label")')])
    if call.target == "perplexity" and ex.texts is None:
        raise FuseErrors([Diagnostic("E006", "perplexity() needs text: name the text column with text=", data.span,
                                     'e.g. dataset("held_out.jsonl", text="text")')])
    if call.target == "exact_match" and (ex.prompts is None or ex.answers is None):
        missing = " and ".join(k for k, v in (("prompt=", ex.prompts), ("answer=", ex.answers)) if v is None)
        raise FuseErrors([Diagnostic("E006", f"exact_match() needs prompts and answers: name their columns with "
                                     f"{missing}", data.span,
                                     'e.g. dataset("qa.jsonl", prompt="question", answer="answer")')])
    new = args.get("max_new_tokens")
    if call.target == "exact_match" and new is not None and (isinstance(new, bool) or float(new) != int(new)
                                                              or new < 1):
        at = (dict(zip(("data", "batch_size", "max_new_tokens"), call.args)) | dict(call.kwargs)).get("max_new_tokens")
        shown = int(new) if isinstance(new, float) and new.is_integer() else new
        raise FuseErrors([Diagnostic("E006", f"max_new_tokens={shown!r} must be a whole number of at least 1",
                                     at.span if at is not None else call.span,
                                     "leave it out: the longest answer's tokens + 2 are decoded")])
    default_bs = {"accuracy": 32, "perplexity": 8, "exact_match": 16}[call.target]
    task = {"kind": call.target, "data": data.spec, "batch_size": int(bs or default_bs), "span": b.span}
    if call.target == "exact_match":
        task["max_new_tokens"] = int(new) if new is not None else None
    return task


def _lm_eval_task(b: ir.Binding, args: dict) -> dict:
    """An lm_eval() task: its YAML read and its arguments checked (FuseErrors located at
    the argument at fault)."""
    from ..stages.data import DataError
    from . import lm_eval as L

    call = b.value
    exprs = dict(zip(("task", "metric", "limit", "num_fewshot", "batch_size"), call.args)) | dict(call.kwargs)

    def at(name: str):
        return exprs[name].span if name in exprs else call.span

    path = os.path.expanduser(str(args["task"]))
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(call.span.file)), path)
    try:
        info = L.read(os.path.normpath(path))
    except DataError as e:
        raise FuseErrors([Diagnostic(e.code, e.message, at("task"), e.hint)]) from None
    for name, lo in (("limit", 1), ("num_fewshot", 0), ("batch_size", 1)):
        v = args.get(name)
        if v is not None and (isinstance(v, bool) or float(v) != int(v) or v < lo):
            raise FuseErrors([Diagnostic("E006", f"{name}={v!r} must be a whole number of at least {lo}", at(name),
                                         "e.g. limit=200, num_fewshot=5, batch_size=8")])
    metric = args.get("metric")
    if metric is not None and info["metrics"] and metric not in info["metrics"]:
        raise FuseErrors([Diagnostic("E006", f"metric={metric!r} is not in the task's metric_list "
                                     f"({', '.join(info['metrics'])})", at("metric"),
                                     f"one of {', '.join(info['metrics'])}, or leave it out for the first")])
    if not L.available():
        raise FuseErrors([Diagnostic("E014", "lm_eval() needs the lm-evaluation-harness, which is not installed",
                                     call.span, "pip install 'fusionlang[lm-eval]' (lm-eval 0.4)")])
    return {"kind": "lm_eval", **info, "metric": metric, "limit": int(args["limit"]) if args.get("limit") else None,
            "num_fewshot": int(args["num_fewshot"]) if args.get("num_fewshot") is not None else None,
            "batch_size": int(args.get("batch_size") or 8), "span": b.span}


def is_zoo_task(task: dict) -> bool:
    return task.get("kind", "zoo") == "zoo"


def has_references(task: dict) -> bool:
    """Whether the task's zoo has the reference rows (pre-trained, fine-tuned expert): not
    the nets zoo, whose models are all trained from scratch."""
    return is_zoo_task(task) and getattr(task.get("spec"), "kind", "") != "nets"


def check_fit(prog: ir.Program) -> None:
    """E014 at the `eval` for each evaluated model whose architecture is not that of its
    task's zoo (the `model_type` and `hidden_size` of the zoo's pre-trained model): a
    task's head reads the zoo model's features, so e.g. a Llama merge cannot be scored on
    a BERT zoo task. A merge's architecture is that of the model its output takes its
    config from; models without a readable config.json are left to lowering's errors."""
    from ..plan.lower import Lowerer
    from ..plan.moe_values import moe_call

    low = Lowerer(prog)
    diags: list[Diagnostic] = []
    for ev in prog.evals:
        adapters = [q.split("::")[-1] for q in ev.models
                    if prog.bindings[q].kind == "merge" and moe_call(low, prog.bindings[q], "extract_lora")]
        for name in adapters:
            diags.append(Diagnostic("E014", f"'{name}' is a LoRA adapter (extract_lora), not a model to score",
                                    ev.span, "evaluate the fine-tune it comes from; PEFT applies the adapter to its "
                                    "base (PeftModel.from_pretrained(base, dir))"))
        if adapters:
            continue
        dirs = models_dirs(prog, low, ev)
        models = [(name, config) for name, d in dirs for config in [_read_config(d)] if config is not None]
        for t in ev.tasks:
            task = resolve_task(prog, t)
            if not is_zoo_task(task):
                diags += _user_fit(prog, low, ev, task, t, dirs)
                continue
            spec = task["spec"]
            want = _read_config(str(spec.base_dir)) or {}
            for name, config in models:
                mine = (config.get("model_type"), config.get("hidden_size"))
                theirs = (want.get("model_type"), want.get("hidden_size"))
                if mine != theirs:
                    diags.append(Diagnostic(
                        "E014", f"'{name}' is a {mine[0]} model (hidden size {mine[1]}) but task '{t.split('::')[-1]}' "
                        f"reads {theirs[0]} features (hidden size {theirs[1]}, the '{spec.zoo_dir.name}' zoo's model)",
                        ev.span, "evaluate it on a task of a zoo with the same architecture, or merge models of that zoo"))
    if diags:
        raise FuseErrors(diags)


def models_dirs(prog: ir.Program, low, ev: ir.EvalIR) -> list[tuple[str, str]]:
    """(row name, model directory whose config describes it) of an eval's models; a
    merge is described by its reference input, an ensemble by each member."""
    from ..plan.values import EvalError
    from .ensembles import members

    def merge_ref(q: str) -> str | None:
        try:
            return low.plan.sources[low.domain(prog.bindings[q]).reference].path
        except (EvalError, KeyError):
            return None

    out = []
    for q in ev.models:
        b = prog.bindings[q]
        short = q.split("::")[-1]
        if b.kind == "merge":
            ref = merge_ref(q)
            if ref:
                out.append((short, ref))
        elif b.kind == "ensemble":
            for name, kind, what in members(prog, q):
                d = merge_ref(what) if kind == "merge" else source_model_dir(prog, what)
                if d:
                    out.append((f"{short}: {name}", d))
        else:
            items = b.value.items if isinstance(b.value, ir.ListE) else [b.value]
            for i, item in enumerate(items):
                out.append((short if b.kind == "model" else f"{short}[{i}]", source_model_dir(prog, item)))
    return out


def _user_fit(prog, low, ev: ir.EvalIR, task: dict, t: str, models: list[tuple[str, str]]) -> list[Diagnostic]:
    from ..stages.data import DataError
    from .user_tasks import check

    diags = []
    for name, d in models:
        try:
            check(task, d, name)
        except DataError as e:
            diags.append(Diagnostic(e.code, f"{e.message} (task '{t.split('::')[-1]}')", ev.span, e.hint))
    return diags


def _read_config(model_dir: str) -> dict | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def prepare(prog: ir.Program) -> EvalSetup:
    """Locate every evaluated model (adding outputs for unsaved merges) and task."""
    from . import ensembles as E

    setup = EvalSetup(prog)
    saved = {s.name: s.path for s in prog.saves}
    extra: list[ir.SaveIR] = []

    def merge_dir(q: str, span) -> str:
        if q not in saved:
            # NOTE: only a name: the run creates it (as an output's parent) and removes it;
            # `check` and `compile` create nothing
            setup.tmpdir = setup.tmpdir or os.path.join(
                tempfile.gettempdir(), f"fusionlang-eval-{os.getpid()}-{secrets.token_hex(4)}")
            saved[q] = os.path.join(setup.tmpdir, q.split("::")[-1])
            extra.append(ir.SaveIR(name=q, display=q.split("::")[-1], path=saved[q], dtype=None, span=span,
                                   path_span=span))
        return saved[q]

    def ensemble(q: str, span) -> dict:
        out = []
        for name, kind, what in E.members(prog, q):
            out.append({"name": name, "path": merge_dir(what, span) if kind == "merge" else source_model_dir(prog, what)})
        return {"members": out, **E.spec(prog, q)}

    for s in prog.ensemble_saves:
        unsaved = [n for n, kind, q in E.members(prog, s.name) if kind == "merge" and q not in saved]
        if unsaved:
            raise FuseErrors([Diagnostic("E016", f"ensemble '{s.display}' has the member '{unsaved[0]}', a merge no "
                                         "`save` writes: the manifest names its members' directories", s.span,
                                         f'save it too, e.g. save {unsaved[0]} to "out/{unsaved[0]}"')])
        problem = E.check_target(s.path)
        if problem:
            raise FuseErrors([Diagnostic("E016", problem, s.path_span, "save the ensemble to a new directory")])
        setup.ensemble_saves.append((s.path, ensemble(s.name, s.span)))
    for ev in prog.evals:
        rows = []
        for q in ev.models:
            b = prog.bindings[q]
            short = q.split("::")[-1]
            if b.kind == "merge":
                setup.models[short] = merge_dir(q, ev.span)
                rows.append(short)
            elif b.kind == "ensemble":
                setup.ensembles[short] = ensemble(q, ev.span)
                setup.models[short] = f"<ensemble {short}>"
                rows.append(short)
            else:
                items = b.value.items if isinstance(b.value, ir.ListE) else [b.value]
                for i, item in enumerate(items):
                    path = source_model_dir(prog, item)
                    name = short if b.kind == "model" else source_name(prog, item, path) or f"{short}[{i}]"
                    if setup.models.get(name, path) != path or name in rows:
                        name = f"{short}[{i}]"  # another row has this name: the list entry's own
                    setup.models[name] = path
                    rows.append(name)
        tasks = []
        for q in ev.tasks:
            name = q.split("::")[-1]
            setup.tasks.setdefault(name, resolve_task(prog, q))
            tasks.append(name)
        setup.reports.append((rows, tasks, ev.report or _default_report(prog)))
    setup.program = prog.model_copy(update={"saves": prog.saves + tuple(extra)})
    return setup




def display_path(setup: EvalSetup | None, path: str) -> str:
    """How an output path is shown in tables: a merge written only to be evaluated lives in
    a temporary directory that is removed after the evaluation, so it is not shown."""
    if setup is not None and setup.tmpdir and os.path.abspath(path).startswith(os.path.abspath(setup.tmpdir) + os.sep):
        return "(temporary: evaluated, then removed)"
    return path


def _default_report(prog: ir.Program) -> str:
    spec = Path(prog.file).resolve()
    return str(spec.parent / f"{spec.stem}-report")




def _reference_name(setup: EvalSetup, model_dir: str, task: str) -> str:
    pre, _fine = _reference_dirs(setup, task)
    return "pretrained" if model_dir == pre else "fine-tuned"


def score_task(model_dir: str | dict, task: dict, device: str, split: str | None = None, on_batch=None) -> dict:
    """evaluate() a model directory on a task (resolve_task's arguments), on the task's
    own split unless `split` is given (a zoo task; a task on the user's data scores its
    data value); `on_batch(done, total)` after each batch. `model_dir` may be an
    ensemble (`ensembles`: its members, weights, mode): the members' logits combine."""
    from ..zoo.evaluate import evaluate

    if not is_zoo_task(task):
        from .user_tasks import score

        return score(model_dir, task, device, on_batch)

    return evaluate(model_dir, task["spec"], split=split or task.get("split", "test"), device=device,
                    batch_size=int(task.get("batch_size") or 128),
                    limit=int(task["limit"]) if task.get("limit") is not None else None, on_batch=on_batch)


def _reference_dirs(setup: EvalSetup, task: str) -> tuple[str, str]:
    """(pre-trained, fine-tuned expert) model directories of a task's zoo."""
    spec = setup.tasks[task]["spec"]
    return str(spec.base_dir), str(spec.zoo_dir / spec.name)


def run(setup: EvalSetup, device: str, console) -> list[dict]:
    """Evaluate, print the tables, write report.json and report.png for each `eval`.

    Progress: a plain line per evaluation (`evaluating: 3/12 (soup on austen)`, with the
    elapsed time) at most every $FUSIONLANG_PROGRESS_INTERVAL seconds (default 10), and
    within a long evaluation its batches at the same pace; the last one is always shown."""
    from ..zoo.progress import Heartbeat, stderr_writer

    cache: dict[tuple[str, str], dict] = {}
    needed = {(d, t) for rows, tasks, _ in setup.reports for t in tasks
              for d in (*(_reference_dirs(setup, t) if has_references(setup.tasks[t]) else ()),
                        *(setup.models[r] for r in rows))}
    beat = Heartbeat(stderr_writer(console), "evaluating", "evaluations")
    beat.beat(0, len(needed), "starting", force=True)
    names = {d: r for r, d in setup.models.items()}

    def score(model_dir: str, task: str) -> dict:
        key = (model_dir, task)
        if key not in cache:
            what = f"{names.get(model_dir) or _reference_name(setup, model_dir, task)} on {task}"
            model = setup.ensembles.get(names.get(model_dir), model_dir)
            cache[key] = score_task(model, setup.tasks[task], device,
                                    on_batch=lambda i, n: beat.beat(len(cache), len(needed), f"{what}: batch {i}/{n}"))
            beat.beat(len(cache), len(needed), what)
        return cache[key]

    reports = []
    try:
        for rows, tasks, report_dir in setup.reports:
            report = _table(setup, rows, tasks, score)
            report["device"] = device
            tuned = [r.to_json() for r in setup.tuning if r.merge in rows]
            if tuned:
                report["tuning"] = tuned  # how this report's merges got their tune() values
            learned = {r: setup.learned[r] for r in rows if r in setup.learned}
            if learned:
                report["learned"] = learned  # e.g. AdaMerging's coefficients, per merge
            _print(console, report)
            _write(report_dir, report)
            console.print(f"report: {report_dir}/report.json, report.png")
            reports.append(report)
    finally:
        if setup.tmpdir:
            shutil.rmtree(setup.tmpdir, ignore_errors=True)
    return reports


def _table(setup: EvalSetup, rows: list[str], tasks: list[str], score) -> dict:
    """One `eval`'s report: per row, accuracy on the accuracy tasks (zoo classify() and
    accuracy()), perplexity on the perplexity() tasks; on zoo tasks also the reference
    rows (pre-trained, fine-tuned expert), normalized accuracy and forgetting."""
    zoo = [t for t in tasks if has_references(setup.tasks[t])]
    accs = [t for t in tasks if setup.tasks[t].get("kind") not in ("perplexity", "lm_eval")]
    ppls = [t for t in tasks if setup.tasks[t].get("kind") == "perplexity"]
    lms = [t for t in tasks if setup.tasks[t].get("kind") == "lm_eval"]
    table: dict[str, dict] = {}
    pre = {t: score(_reference_dirs(setup, t)[0], t)["accuracy"] for t in zoo}
    fine = {t: score(_reference_dirs(setup, t)[1], t)["accuracy"] for t in zoo}
    if zoo:
        table["pretrained"] = {"accuracy": pre}
        table["fine-tuned (individual)"] = {"accuracy": fine}
    for r in rows:
        res = {t: score(setup.models[r], t) for t in tasks}
        acc = {t: res[t]["accuracy"] for t in accs}
        row = {"accuracy": acc}
        if ppls:
            row["perplexity"] = {t: res[t]["perplexity"] for t in ppls}
            row["loss"] = {t: res[t]["loss"] for t in ppls}
        if lms:
            row["lm_eval"] = {t: res[t]["score"] for t in lms}
            row["lm_eval_results"] = {t: res[t]["results"] for t in lms}
        if zoo:
            row["normalized_accuracy"] = {t: acc[t] / fine[t] if fine[t] else float("nan") for t in zoo}
            row["forgetting"] = sum(max(0.0, pre[t] - acc[t]) for t in zoo) / len(zoo)
        row["latency_per_batch_s"] = sum(res[t]["latency_per_batch_s"] for t in tasks) / len(tasks)
        row["peak_mem_bytes"] = max(res[t]["peak_mem_bytes"] for t in tasks)
        table[r] = row
    for row in table.values():
        a = row["accuracy"]
        row["average"] = sum(a.values()) / len(a) if a else float("nan")
    definitions = {"accuracy": "fraction of rows whose predicted class is the label",
                   "perplexity": "exp(mean next-token cross-entropy over the data's tokens); lower is better"}
    ems = [t for t in tasks if setup.tasks[t].get("kind") == "exact_match"]
    if ems:
        definitions["exact_match"] = ("fraction of rows whose greedy continuation of the prompt answers exactly "
                                      "(the leading integer of a numeric answer, else the first line's prefix of "
                                      "the answer's length); shown as the task's accuracy")
    if zoo:
        definitions |= {"normalized_accuracy": "accuracy / fine-tuned accuracy on the task",
                        "forgetting": "mean over zoo tasks of max(0, pretrained - model accuracy)"}
    report = {"tasks": tasks, "accuracy_tasks": accs, "perplexity_tasks": ppls, "rows": table,
              "definitions": definitions}
    if ems:
        report["exact_match_tasks"] = ems
    if lms:
        first = next(iter(rows), None)
        report["lm_eval_tasks"] = {t: {"metric": score(setup.models[first], t)["metric"],
                                       "higher_is_better": score(setup.models[first], t)["higher_is_better"],
                                       "task": setup.tasks[t]["name"]} for t in lms} if first else {}
        definitions["lm_eval"] = "the task's metric as lm-evaluation-harness computes it (lm_eval_tasks names it)"
    return report


def _print(console, report: dict) -> None:
    from rich.table import Table

    tasks = report["tasks"]
    ppls = set(report.get("perplexity_tasks", ()))
    lms = report.get("lm_eval_tasks", {})
    title = "accuracy (%) on the test splits" + (" and perplexity (ppl, lower is better)" if ppls else "") + (
        "; lm-eval tasks: their metric" if lms else "")
    t = Table(title=title, title_justify="left")
    t.add_column("model")
    for name in tasks:
        ems = report.get("exact_match_tasks", ())
        head = f"{name} (ppl)" if name in ppls else f"{name} ({lms[name]['metric']})" if name in lms else \
            f"{name} (EM)" if name in ems else name
        t.add_column(head, justify="right")
    for c in ("avg", "norm. avg", "forgetting", "ms/batch"):
        t.add_column(c, justify="right")

    def cell(row: dict, k: str) -> str:
        if k in ppls:
            return f"{row['perplexity'][k]:.2f}" if "perplexity" in row else ""
        if k in lms:
            return f"{row['lm_eval'][k]:.4g}" if "lm_eval" in row else ""
        return f"{100 * row['accuracy'][k]:.1f}" if k in row["accuracy"] else ""

    for name, row in report["rows"].items():
        norm = row.get("normalized_accuracy")
        avg = row["average"]
        t.add_row(name, *[cell(row, k) for k in tasks], f"{100 * avg:.1f}" if math.isfinite(avg) else "",
                  f"{100 * sum(norm.values()) / len(norm):.1f}" if norm else "",
                  f"{100 * row['forgetting']:.1f}" if "forgetting" in row else "",
                  f"{1000 * row['latency_per_batch_s']:.0f}" if "latency_per_batch_s" in row else "",
                  style="dim" if name in ("pretrained", "fine-tuned (individual)") else None)
    console.print(t)
    from .search_report import show

    show(console, report)  # a search's trials and Pareto front
    for rec in report.get("tuning", ()):
        for n in rec.get("notes", ()):
            console.print(f"note: {n}", markup=False, highlight=False, soft_wrap=True)


def _write(report_dir: str, report: dict) -> None:
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    from .search_report import write

    write(report, d)  # search-MERGE.png, named in report.json
    tmp = d / ".report.json.tmp"
    tmp.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, d / "report.json")
    try:
        from PIL import Image, ImageDraw  # noqa: F401
    except ImportError:
        return
    plot_png(report, d / "report.png")


def _json_safe(v):
    """`v` with every non-finite float (e.g. a normalized accuracy whose fine-tuned
    accuracy is 0) as None: report.json stays valid JSON (RFC 8259 has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def plot_png(report: dict, path: Path) -> None:
    """Grouped bars: one group per accuracy task (+ average), one bar per model row; a
    perplexity task's group shows each row's perplexity relative to the largest."""
    from PIL import Image, ImageDraw

    accs = report.get("accuracy_tasks", report["tasks"])
    ppls = report.get("perplexity_tasks", [])
    tasks = accs + (["average"] if accs else []) + ppls
    rows = list(report["rows"])
    colors = [(150, 150, 150), (60, 60, 60), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
              (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
    bar, gap, left, top, height = 14, 24, 50, 20, 300
    width = left + len(tasks) * (len(rows) * bar + gap) + 20
    img = Image.new("RGB", (max(width, 420), top + height + 60 + 14 * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    for pct in range(0, 101, 20):
        y = top + height - pct * height // 100
        draw.line([(left - 4, y), (width - 10, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{pct}%", fill="black")
    for ti, task in enumerate(tasks):
        x0 = left + ti * (len(rows) * bar + gap)
        for ri, name in enumerate(rows):
            row = report["rows"][name]
            if task in ppls:
                top_ppl = max((r.get("perplexity", {}).get(task, 0.0) for r in report["rows"].values()), default=0.0)
                v = row.get("perplexity", {}).get(task, 0.0) / top_ppl if top_ppl else 0.0
            else:
                v = row["average"] if task == "average" else row["accuracy"].get(task, 0.0)
            h = int(max(0.0, min(1.0, v)) * height) if math.isfinite(v) else 0
            draw.rectangle([x0 + ri * bar, top + height - h, x0 + (ri + 1) * bar - 2, top + height],
                           fill=colors[ri % len(colors)])
        draw.text((x0, top + height + 6), (task[:8] + " ppl") if task in ppls else task[:12], fill="black")
    for ri, name in enumerate(rows):
        y = top + height + 28 + 14 * ri
        draw.rectangle([left, y, left + 10, y + 10], fill=colors[ri % len(colors)])
        draw.text((left + 16, y - 1), name, fill="black")
    img.save(path)
