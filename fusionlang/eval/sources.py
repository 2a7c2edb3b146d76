"""The evaluated models of a spec as directories: where a source call's model lives, the
name a user knows it by, a call's evaluated arguments, a causal LM loaded for scoring.
Shared by evaluation, ensembles and the task scorers."""

from __future__ import annotations

import os

from .. import ir
from ..lang.diagnostics import Diagnostic, FuseErrors
from ..runtime.sources import SourceError, is_source_call, source_dir


def call_args(prog: ir.Program, call: ir.CallE) -> dict:
    """A call's arguments evaluated without model files (a dry lowering at a probe
    tensor): strings, numbers, lists and data values. Raises FuseErrors."""
    from ..plan.lower import Lowerer
    from ..plan.values import PROBE, TensorCtx

    return Lowerer(prog, dry=True).call_args(call, (), TensorCtx(PROBE, PROBE, 0, 2))


def source_name(prog: ir.Program, e: ir.Expr, path: str) -> str | None:
    """The name a user knows a listed model by: the `model` binding it refers to, the zoo
    model (zoo("text", "austen") -> "austen"), the repository (hf("org/m") -> "org/m"),
    else the name of its directory `path` (local("ft/math") -> "math"); None when it has none."""
    if isinstance(e, ir.Ref) and e.scope == "global":
        return e.name.split("::")[-1]
    if not is_source_call(e):
        return None
    try:
        args = call_args(prog, e)
    except FuseErrors:
        return None
    if e.target == "zoo":
        return str(args.get("model") or "base")
    if e.target == "hf":
        return str(args["repo"])
    return os.path.basename(os.path.normpath(os.path.abspath(path))) or None


def source_model_dir(prog: ir.Program, e: ir.Expr) -> str:
    if isinstance(e, ir.Ref) and e.scope == "global":
        return source_model_dir(prog, prog.bindings[e.name].value)
    if is_source_call(e):
        try:
            return source_dir(e.target, call_args(prog, e), e.span.file)
        except SourceError as err:
            raise FuseErrors([Diagnostic(err.code, err.message, e.span, err.hint)]) from None
    raise FuseErrors([Diagnostic("E005", "only merges and models (local(), hf(), zoo(), package()) can be evaluated", e.span,
                                 "evaluate a merge, or declare the model with `model NAME = local(\"dir\")`")])


def load_causal_lm(model_dir: str, device: str):
    """(model, tokenizer) of a causal LM directory for scoring: `AutoModelForCausalLM` in
    float32 and eval mode on `device` (a SMILE / WEMoE model with its upscaled layers),
    transformers' messages quieted, the device's peak-memory counter reset."""
    import torch

    from ..zoo.text import _quiet_transformers

    _quiet_transformers()
    import transformers

    from ..arch.upscaled import from_pretrained

    model = from_pretrained(transformers.AutoModelForCausalLM, model_dir, local_files_only=True,
                            dtype=torch.float32).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    return model, tok
