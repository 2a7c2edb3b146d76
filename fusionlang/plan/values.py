"""The values of lowering: what a `.fuse` expression evaluates to at one tensor name
(`TensorV`: a plan node with its shape and dtype; `SliceV`: a layer range of a model;
numbers, strings, lists), the tensor context it is evaluated in, and lowering's errors.
No torch import."""

from __future__ import annotations

from dataclasses import dataclass

from .. import arch, ir
from ..lang.diagnostics import Diagnostic, Span
from ..ops import OPS

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SAVE_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def param_names(prog: ir.Program, call: ir.CallE) -> list[str]:
    """The parameter names of a call's target (a def, an op or a builtin), in order."""
    if call.kind == "def":
        return [p.name for p in prog.defs[call.target].params]
    if call.kind == "op":
        return [p.name for p in OPS[call.target].params]
    from ..lang.signatures import BUILTINS

    return [p[0] for p in BUILTINS[call.target].params]


def builtin_exprs(call: ir.CallE) -> dict[str, ir.Expr]:
    """A builtin call's argument expressions by parameter name (positional and keyword)."""
    return dict(zip(param_names(None, call), call.args)) | dict(call.kwargs)


def builtin_options(ev, call: ir.CallE, models: tuple[str, ...]) -> dict:
    """A builtin call's arguments other than `models`, evaluated once (they do not depend
    on the tensor) with the signature's defaults filled in, and "spans": parameter name ->
    the span of the argument the user wrote (for errors located at it)."""
    from ..lang.signatures import BUILTINS

    exprs = builtin_exprs(call)
    probe = TensorCtx(PROBE, PROBE, 0, 2)
    o = {name: (ev.eval(exprs[name], (), probe) if name in exprs else default)
         for name, _, default in BUILTINS[call.target].params if name not in models}
    o["spans"] = {k: e.span for k, e in exprs.items()}
    return o


class EvalError(Exception):
    def __init__(self, code: str, message: str, span: Span, hint: str = "", more: tuple[Diagnostic, ...] = ()):
        super().__init__(message)
        self.diag = Diagnostic(code, message, span, hint)
        self.diags = [self.diag, *more]  # every error found at once (e.g. all bad arguments of a call)


@dataclass(frozen=True)
class Origin:
    """Where a `def` parameter's value came from: the argument the user wrote."""

    span: Span
    func: str  # the function the user called
    param: str  # its parameter the argument was passed to


def origin_key(name: str) -> str:
    return "@" + name  # env entries for origins; '@' cannot start a name


class MissingTensor(Exception):
    def __init__(self, source: str, tensor: str, span: Span):
        super().__init__(tensor)
        self.source, self.tensor, self.span = source, tensor, span


@dataclass(frozen=True)
class TensorV:
    node: str
    shape: tuple[int, ...] | None
    dtype: str | None


@dataclass(frozen=True)
class PerModelV:
    """`per_model([v0, v1, ...])`: one value per model (MergeKit's per-model parameters).
    Where a method applies an argument to each model in turn (a comprehension over a list
    of as many models, `[trim(m - base, density) for m in models]`), the argument is the
    i-th value for the i-th model; anywhere else it is an error (E006 at `span`)."""

    values: tuple
    span: Span


@dataclass(frozen=True)
class SliceV:
    expr: ir.Expr
    env: tuple
    start: int
    end: int
    span: Span
    # a merged slice (MergeKit's slice with several sources): `expr` is a merge whose
    # models are layers(m, start, end) calls of one length, evaluated layer by layer
    merged: bool = False


@dataclass
class TensorCtx:
    tensor: str  # the tensor name being read from inputs
    group: str  # the output tensor this computation belongs to
    layer: int | None
    num_layers: int
    output: str = ""  # the output tensor, when several share one group (a SMILE layer's factors)

    @property
    def t(self) -> float:
        return arch.gradient_t(self.layer, self.num_layers)


PROBE = "model.layers.0.probe.weight"
# Errors of reading a model: absent directory or cache entry, unreadable or corrupt files.
SOURCE_ERROR_CODES = {"E010", "E011", "E017", "E018"}



def at(span: Span) -> tuple:
    """A span as the plan stores it: (file, line, column, end line, end column)."""
    return (span.file, span.line, span.col, span.end_line, span.end_col)
