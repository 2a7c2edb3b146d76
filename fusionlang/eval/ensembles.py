"""Ensembles: prediction-level combinations of models (no merged weights).

    ensemble ens = ensemble(experts, weights=[0.6, 0.4], normalize=true, mode="mean")

For a batch, every member runs and the outputs (a classifier's logits) combine:
    mode="mean", no weights   mean_i y_i                      FusionBench simple_ensemble (EnsembleModule)
    mode="mean", weights w    Σ_i w_i y_i (w / Σ w with normalize)   weighted_ensemble (WeightedEnsembleModule)
    mode="max"                elementwise max_i y_i           max_model_predictor (MaxModelPredictor)
`eval` scores an ensemble like a model (its members on the task, outputs combined before
the argmax). `save ENS to "dir"` writes `dir/fusionlang_ensemble.json` (members by
absolute directory, weights, mode): a manifest, not weights. `fusionlang.load(dir)`
returns an `EnsembleModule` whose forward runs every member and combines their `logits`
(or their output tensor).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import ir
from ..lang.diagnostics import Diagnostic, FuseErrors
from ..ops.ensemble import combine

MANIFEST = "fusionlang_ensemble.json"
MODES = ("mean", "max")


def members(prog: ir.Program, qual: str) -> list[tuple[str, str, ir.Expr]]:
    """(row name, "merge" | "source", qualified merge name or the source expression) of
    an ensemble's members. FuseErrors (E005) for a member that is not a model by name."""
    b = prog.bindings[qual]
    call = b.value
    arg = dict(zip(("models", "weights", "normalize", "mode"), call.args)) | dict(call.kwargs)
    items = _items(prog, arg["models"])
    from .sources import source_model_dir, source_name

    out = []
    for i, e in enumerate(items):
        if isinstance(e, ir.IndexE):
            e = _items(prog, e)[0]
        b = prog.bindings.get(e.name) if isinstance(e, ir.Ref) and e.scope == "global" else None
        if b is not None and b.kind == "merge":
            out.append((e.name.split("::")[-1], "merge", e.name))
        elif b is not None and b.kind == "model":
            out.append((e.name.split("::")[-1], "source", b.value))
        elif isinstance(e, ir.CallE) and e.kind == "builtin" and e.target in ("local", "hf", "zoo", "package"):
            out.append((source_name(prog, e, source_model_dir(prog, e)) or f"member{i}", "source", e))
        else:
            raise FuseErrors([Diagnostic("E005", "an ensemble's members are models and merges by name", e.span,
                                         "declare the member with `merge NAME = ...` and list NAME")])
    return out


def _items(prog: ir.Program, e: ir.Expr) -> list[ir.Expr]:
    if isinstance(e, ir.Ref) and e.scope == "global" and prog.bindings[e.name].kind in ("models", "let"):
        return _items(prog, prog.bindings[e.name].value)
    if isinstance(e, ir.ListE):
        return list(e.items)
    if isinstance(e, ir.IndexE) and isinstance(e.index, ir.Const):
        return [_items(prog, e.value)[int(e.index.value)]]
    raise FuseErrors([Diagnostic("E005", "an ensemble takes a list of models and merges, e.g. [ta, ties] or experts",
                                 e.span, "list the members by name")])


def spec(prog: ir.Program, qual: str) -> dict:
    """The ensemble's weights, normalize and mode, checked (FuseErrors E006)."""
    from .sources import call_args

    call = prog.bindings[qual].value
    args = call_args(prog, call)
    mode, weights, normalize = str(args.get("mode") or "mean"), args.get("weights"), bool(args.get("normalize", True))
    n = len(members(prog, qual))
    if mode not in MODES:
        raise FuseErrors([Diagnostic("E006", f"mode={mode!r} is not an ensemble mode", call.span,
                                     'mode="mean" (weighted with weights=) or "max"')])
    if weights is not None:
        weights = [float(w) for w in weights]
        if mode == "max":
            raise FuseErrors([Diagnostic("E006", 'weights do not apply to mode="max" (an elementwise max)', call.span,
                                         'leave weights out, or use mode="mean"')])
        if len(weights) != n:
            raise FuseErrors([Diagnostic("E006", f"{len(weights)} weights for {n} ensemble members", call.span,
                                         "give one weight per member")])
        if normalize and abs(sum(weights)) < 1e-12:
            raise FuseErrors([Diagnostic("E006", "the weights sum to 0, so normalize=true cannot divide by their sum",
                                         call.span, "pass normalize=false, or change the weights")])
    return {"weights": weights, "normalize": normalize, "mode": mode}


def write_manifest(path: str, ens: dict) -> None:
    """Write `path/fusionlang_ensemble.json` atomically (a temporary file renamed)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"fusionlang_ensemble": 1, **ens}, indent=2) + "\n")
    os.replace(tmp, d / MANIFEST)


def check_target(path: str) -> str | None:
    """Why an ensemble cannot be saved to `path` (None when it can): an existing file, or
    a directory holding anything but a previous manifest (nothing the user owns is replaced)."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        return f"'{path}' exists and is not a directory"
    if d.is_dir():
        other = [p.name for p in d.iterdir() if p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.")]
        if other:
            return f"'{path}' holds other files ({', '.join(sorted(other)[:3])}): an ensemble manifest goes into its own directory"
    return None


def write_all(saves: list[tuple[str, dict]]) -> list[str]:
    """Write each (directory, manifest); returns the manifest paths. Raises RunError (E016)."""
    from ..runtime.errors import RunError

    out = []
    for path, ens in saves:
        problem = check_target(path)
        if problem:
            raise RunError(problem, "save the ensemble to a new directory", "E016")
        try:
            write_manifest(path, ens)
        except OSError as e:
            raise RunError(f"cannot write the ensemble manifest to '{path}': {e}", "choose a writable directory",
                           "E016") from None
        out.append(str(Path(path) / MANIFEST))
    return out


def read_manifest(path: str | os.PathLike) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    if not isinstance(data, dict) or data.get("fusionlang_ensemble") != 1:
        raise ValueError(f"{f} is not a fusionlang ensemble manifest")
    return data


def module(manifest: dict, load):
    """A torch module running the manifest's members (each loaded with `load(dir)`)."""
    import torch

    class EnsembleModule(torch.nn.Module):
        """Runs every member on the same inputs and combines their logits (or output
        tensors): mean, weighted (normalised) or elementwise max (fusionlang.eval.ensembles)."""

        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList([load(m["path"]) for m in manifest["members"]])
            self.weights, self.normalize, self.mode = manifest["weights"], manifest["normalize"], manifest["mode"]

        def forward(self, *args, **kwargs):
            outs = []
            for m in self.members:
                y = m(*args, **kwargs)
                outs.append(getattr(y, "logits", None) if getattr(y, "logits", None) is not None else
                            (y if isinstance(y, torch.Tensor) else y[0]))
            return combine(outs, self.weights, self.normalize, self.mode)

    return EnsembleModule().eval()
