"""The Python API: what `fusionlang check / compile / run` do, as functions.

    import fusionlang

    fusionlang.check("merge.fuse")                 # CheckResult; FuseErrors if the spec has errors
    plan = fusionlang.compile("merge.fuse")        # the optimized merge plan (nothing written)
    result = fusionlang.run("merge.fuse")          # RunResult: outputs written, eval reports
    model = fusionlang.load(result.outputs["ta"])  # a transformers model

Every user mistake raises :class:`fusionlang.FuseErrors` (``fusionlang.lang.diagnostics``),
whose ``diagnostics`` are the located ``Diagnostic`` objects the command line prints
(file, line, column, code, message, hint); nothing partial is left on disk. The functions
build on the command line's own pieces (``pipeline.check`` / ``compile_spec``,
``tuning.resolve``, ``runtime.scheduler.run_plan``, ``evaluation.run``), so a spec behaves the same
from Python and from the shell. See docs/api.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .lang.diagnostics import Diagnostic, FuseErrors, Span
from .pipeline import load_plan, remove_eval_tmpdir

__all__ = ["FuseErrors", "RunResult", "check", "compile", "load", "run"]

DEVICES = ("auto", "cpu", "cuda", "mps")


def _here(path) -> Span:
    return Span(str(path), 1, 1)


def check(path: str | os.PathLike):
    """Check a spec as `fusionlang check` does: syntax, names, types, signatures, argument
    values, and (when the model files are present) tensor names, shapes, dtypes and rule
    patterns. Reads headers only; imports no torch.

    Returns a ``pipeline.CheckResult``: ``.diagnostics`` (warnings only, since errors
    raise), ``.unverified`` (what could not be checked because model files are absent,
    as "file:line:col: message" strings), ``.ok`` (True).
    Raises FuseErrors carrying every diagnostic (errors and warnings) if any is an error."""
    from .pipeline import check as _check

    res = _check(os.fspath(path))
    if not res.ok:
        raise FuseErrors(res.diagnostics)
    return res


def _passes(passes: str | Iterable[str] | None) -> set[str] | None:
    """Validated pass names (E004 for an unknown one, as `--passes` on the command line)."""
    if passes is None:
        return None
    from types import SimpleNamespace

    from .cli import _check_pass_args

    names = [p for p in (passes.split(",") if isinstance(passes, str) else list(passes)) if p]
    try:
        _check_pass_args(SimpleNamespace(dump_after=None, passes=",".join(names)))
    except FuseErrors as e:  # located at the caller's argument, not the command line
        raise FuseErrors([replace(d, span=_here("<python>")) for d in e.diagnostics]) from None
    return set(names)


def compile(path: str | os.PathLike, passes: str | Iterable[str] | None = None):
    """Check and lower a spec, then optimize the plan (`fusionlang compile`); the model
    files must be present (their headers are read; no tensor data). Writes nothing.

    ``passes``: names of the passes to run (an iterable or "fold,cse"), default all.
    Returns the optimized ``fusionlang.plan.graph.Plan``: ``.nodes`` (id -> node with
    ``op``, ``inputs``, ``shape``, ``dtype``), ``.outputs`` (name -> output with ``path``
    and ``tensors``), ``.sources``, ``.history`` (op count after each pass),
    ``.bytes_read()``, ``.bytes_written()``; ``fusionlang.plan.emit.to_text / to_json /
    to_dot`` render it. Each ``tune()`` is planned with its first candidate, as the CLI does.
    Raises FuseErrors (unknown pass: E004; every spec error, located)."""
    from .pipeline import compile_spec

    names = _passes(passes)
    with _diagnosed(path):
        _prog, _lowered, plan = compile_spec(os.fspath(path), names)
    remove_eval_tmpdir(plan)  # compile writes nothing
    return plan


@dataclass
class RunResult:
    """What `run` did. ``outputs``: merge name -> directory written (the spec's `save`s;
    merges only evaluated are written to a temporary directory that is removed after the
    evaluation, and are not listed). ``reports``: one dict per `eval` statement, the
    contents of its report.json (``tasks``, ``rows`` -> accuracy per task, average,
    normalized accuracy, forgetting...). ``tuning``: per tuned merge, every candidate's
    validation scores, the chosen values and notes. ``bytes_read`` / ``bytes_written`` /
    ``seconds``: the merge's I/O and wall time (0 when the spec only evaluates).
    ``warnings``: the spec's warning Diagnostics (W001...), also printed when progress is on."""

    outputs: dict[str, str] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)
    tuning: list[dict] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[Diagnostic] = field(default_factory=list)


def run(path: str | os.PathLike, device: str = "auto", *, passes: str | Iterable[str] | None = None,
        shard_size: float = 4.0, progress: bool = True, executor: str = "local",
        address: str | None = None) -> RunResult:
    """Run a spec (or a plan saved by `fusionlang compile --emit json`) as `fusionlang run`
    does: choose every ``tune()`` on its validation split, merge streaming into atomic
    sharded safetensors outputs (fp32 math, the `save`'s dtype on disk), then run the
    `eval`s (report.json + report.png).

    ``device``: "auto" | "cpu" | "cuda" | "mps". ``shard_size``: max GB per output shard.
    ``progress``: plain progress lines on stderr (throttled, see docs/api.md); False: silent.
    ``executor``: "local" | "ray" (tensor groups, model stages and tune()/search candidates
    as Ray tasks; ``address``: the cluster, default $RAY_ADDRESS or a local instance;
    docs/cluster.md). Returns a RunResult. Raises FuseErrors for every user error (spec, models, device,
    unwritable output, zoo not built...), with nothing partial left behind;
    KeyboardInterrupt propagates after the same clean-up."""
    import math
    import time

    from rich.console import Console

    from .zoo.progress import Heartbeat, stderr_writer

    if device not in DEVICES:
        raise FuseErrors([Diagnostic("E006", f"unknown device {device!r}", _here("<python>"),
                                     f"one of: {', '.join(DEVICES)}")])
    from .runtime.executors import EXECUTORS

    if executor not in EXECUTORS or (address is not None and executor != "ray"):
        raise FuseErrors([Diagnostic("E006", f"unknown executor {executor!r}" if executor not in EXECUTORS
                                     else "address= names a Ray cluster, but the executor is local",
                                     _here("<python>"), "executor='local' or executor='ray' (address= with 'ray')")])
    if not isinstance(shard_size, (int, float)) or not math.isfinite(shard_size) or shard_size * 1024**3 < 1:
        raise FuseErrors([Diagnostic("E006", f"shard_size must be a positive, finite number of GB, not {shard_size!r}",
                                     _here("<python>"), "a size in GB, e.g. shard_size=2")])
    spec = os.fspath(path)
    shard_bytes = int(shard_size * 1024**3)
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120, quiet=not progress)
    result = RunResult()
    plan = None
    try:
        with _diagnosed(spec):
            from .runtime.executors import run_plan
            from .runtime.reader import pick_device

            eval_device = pick_device(device).type
            if spec.endswith(".json"):
                plan = load_plan(spec)
            else:
                from .pipeline import compile_spec, make_tuner

                _prog, _lowered, plan = compile_spec(spec, _passes(passes), tuner=make_tuner(device, console, shard_bytes,
                                                                                          executor, address))
                result.warnings = list(_prog.warnings)
                if result.warnings:
                    from .lang.diagnostics import render_all

                    console.print(render_all(result.warnings, False), markup=False, highlight=False, soft_wrap=True)
            setup = getattr(plan, "eval_setup", None)
            if plan.outputs:
                beat = Heartbeat(stderr_writer(console), f"merging {Path(spec).name}", "tensors written")
                t0 = time.perf_counter()
                stats = run_plan(plan, device, shard_bytes, lambda d, n: beat.beat(d, n) if progress else None,
                                 executor=executor, address=address)
                result.bytes_read, result.bytes_written = stats.bytes_read, stats.bytes_written
                if setup is not None:
                    setup.learned = stats.learned
                result.seconds = stats.seconds or time.perf_counter() - t0
                from .eval.evaluation import display_path

                result.outputs = {o.name: o.path for o in plan.outputs.values()
                                  if display_path(setup, o.path) == o.path}
            if setup is not None and setup.ensemble_saves:
                from .eval.ensembles import write_all

                write_all(setup.ensemble_saves)
                for out_dir, _manifest in setup.ensemble_saves:
                    result.outputs[Path(out_dir).name] = out_dir
            if setup is not None:
                result.tuning = [r.to_json() for r in setup.tuning]
                if setup.reports:
                    from .eval.evaluation import run as run_evals

                    result.reports = run_evals(setup, eval_device, console)
    finally:
        if plan is not None:
            remove_eval_tmpdir(plan)
    return result


# transformers Auto class by the suffix of config.json's architectures[0]; else AutoModel
AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForImageClassification", "AutoModelForImageClassification"),
)


def auto_class_name(config: dict) -> str:
    """The transformers Auto class `load` uses for a config.json (a dict): chosen by the
    suffix of ``architectures[0]`` (see AUTO_CLASSES: ``LlamaForCausalLM`` ->
    AutoModelForCausalLM, ``ViTForImageClassification`` -> AutoModelForImageClassification,
    ...); AutoModel when there is no such entry or no known suffix (``BertModel``)."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    return next((auto for suffix, auto in AUTO_CLASSES if arch.endswith(suffix)), "AutoModel")


def load(directory: str | os.PathLike, **kwargs: Any):
    """Load a model fusionlang wrote (or any transformers model directory) with the
    transformers Auto class its config.json names (`auto_class_name`), in eval mode;
    an upscaled model (SMILE: a `fusionlang_model.json` next to the weights) is that
    class with its Linear layers replaced by `arch.smile_module.SmileLinear`; an
    ensemble's manifest gives an `EnsembleModule`; a `fusionlang-net` (the nets zoo's
    MLPs and CNNs) its `torch.nn.Sequential` (`arch.nets`).
    ``kwargs`` go to ``from_pretrained`` (e.g. ``torch_dtype=torch.bfloat16``); the
    weights keep the dtype they were saved in unless told otherwise. Never downloads,
    never runs remote code.
    Raises FuseErrors: E010 (no such directory / no config.json), E011 (config.json
    unreadable, or transformers cannot build the model from the files)."""
    import json

    d = Path(directory)
    from .eval.ensembles import module as ensemble_module
    from .eval.ensembles import read_manifest

    try:
        manifest = read_manifest(d)
    except (OSError, ValueError) as e:
        raise FuseErrors([Diagnostic("E011", f"cannot read the ensemble manifest in '{d}': {e}", _here(d),
                                     "re-create it (re-run the spec that saved it)")]) from None
    if manifest is not None:
        return ensemble_module(manifest, lambda p: load(p, **kwargs))
    cfg_path = d / "config.json"
    if not cfg_path.is_file() and (d / "adapter_config.json").is_file():
        raise FuseErrors([Diagnostic("E010", f"'{d}' is a PEFT adapter (adapter_config.json), not a model", _here(d),
                                     "load its base and apply it: peft.PeftModel.from_pretrained(base_model, dir)")])
    if not cfg_path.is_file():
        raise FuseErrors([Diagnostic("E010", f"'{d}' is not a model directory (no config.json)", _here(d),
                                     "pass a directory written by `save` (RunResult.outputs) or a transformers model")])
    try:
        config = json.loads(cfg_path.read_text())
        error = None if isinstance(config, dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        error = str(e)
    if error is not None:
        raise FuseErrors([Diagnostic("E011", f"cannot read '{cfg_path}': {error}", _here(cfg_path),
                                     "re-create the model directory (re-run the spec that saved it)")])
    if config.get("model_type") == "fusionlang-net":  # the nets zoo's MLPs and CNNs (arch.nets)
        from .arch import nets

        try:
            return nets.load(d)
        except (nets.NetError, RuntimeError) as e:
            raise FuseErrors([Diagnostic("E011", f"cannot build the net in '{d}': {e}", _here(d),
                                         "re-create the model directory (re-run the spec that saved it)")]) from None
    import transformers

    from .arch.upscaled import from_pretrained

    cls = getattr(transformers, auto_class_name(config))
    kwargs.setdefault("local_files_only", True)
    kwargs.setdefault("trust_remote_code", False)
    try:  # a SMILE model (fusionlang_model.json): the base class, its modules replaced
        model = from_pretrained(cls, d, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise FuseErrors([Diagnostic("E011", f"transformers cannot load '{d}' with {cls.__name__}: {e}", _here(cfg_path),
                                     "check that config.json matches the weights (re-run the spec that saved it)")]) from None
    return model.eval()


class _diagnosed:
    """Turn the run-time errors the CLI prints as diagnostics (RunError, ZooError) into
    FuseErrors with the same code, location and hint."""

    def __init__(self, path) -> None:
        self.path = os.fspath(path)

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None or isinstance(exc, FuseErrors):
            return False
        from .runtime.errors import RunError
        from .zoo.errors import ZooError

        if isinstance(exc, RunError):
            span = Span(*exc.at) if exc.at else _here(self.path if exc.code != "E006" else "<python>")
            raise FuseErrors([Diagnostic(exc.code, exc.message, span, exc.hint or "see the message")]) from None
        if isinstance(exc, ZooError):
            raise FuseErrors([Diagnostic("E018", exc.message, _here(self.path),
                                         exc.hint or "see docs/zoo.md")]) from None
        return False
