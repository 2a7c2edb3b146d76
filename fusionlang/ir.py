"""Typed, resolved IR (frozen pydantic models). Every node keeps its Span.

Types are plain strings: model, models, number, numbers, int, string, bool, none,
list, function, slice, any. `number` also covers per-layer schedules (ramp, gradients).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

from .lang.diagnostics import Span


class IR(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


class Const(IR):
    span: Span
    type: str
    value: float | bool | str | None


class Ref(IR):
    """A resolved name: a global (`module::name`) or a local (parameter, loop variable)."""

    span: Span
    type: str
    name: str
    scope: Literal["global", "local"]


class ListE(IR):
    span: Span
    type: str
    items: tuple[Expr, ...]


class Comp(IR):
    span: Span
    type: str
    body: Expr
    var: str
    iterable: Expr


class Bin(IR):
    span: Span
    type: str
    op: Literal["+", "-", "*", "/", "==", "!="]
    left: Expr
    right: Expr


class Neg(IR):
    span: Span
    type: str
    operand: Expr


class CondE(IR):
    span: Span
    type: str
    test: Expr
    then: Expr
    other: Expr


class IndexE(IR):
    span: Span
    type: str
    value: Expr
    index: Expr


class CallE(IR):
    """A call to a registered op, a `def` (by qualified name) or a builtin."""

    span: Span
    type: str
    kind: Literal["op", "def", "builtin"]
    target: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...]


Expr = Union[Const, Ref, ListE, Comp, Bin, Neg, CondE, IndexE, CallE]  # noqa: UP007 (pydantic needs a runtime Union)
for _cls in (ListE, Comp, Bin, Neg, CondE, IndexE, CallE):
    _cls.model_rebuild()


class ParamIR(IR):
    name: str
    type: str
    default: Expr | None
    span: Span


class DefIR(IR):
    qualname: str
    params: tuple[ParamIR, ...]
    returns: str
    body: Expr
    span: Span


class Binding(IR):
    """A global value: `model`, `models`, `let`, `merge` (with its rule block), `task` or `data`."""

    qualname: str
    kind: Literal["model", "models", "let", "merge", "task", "data", "ensemble"]
    type: str
    value: Expr
    rules: tuple[RuleIR, ...] = ()
    span: Span


class RuleIR(IR):
    pattern: str
    regex: str
    captures: tuple[str, ...]
    value: Expr
    span: Span
    pattern_span: Span


Binding.model_rebuild()


class SaveIR(IR):
    name: str  # qualified binding name
    display: str
    path: str  # absolute
    dtype: Literal["bf16", "fp16", "fp32"] | None
    span: Span
    path_span: Span


class EvalIR(IR):
    """`eval m1, m2 on t1, t2 [to "dir"]`: qualified names of models and tasks."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    report: str | None  # absolute directory for the report files
    span: Span


class Program(IR):
    """A checked spec: every global binding and def it can reach, and its outputs."""

    file: str
    text: str
    module: str  # the entry module's key
    bindings: dict[str, Binding]
    defs: dict[str, DefIR]
    saves: tuple[SaveIR, ...]
    evals: tuple[EvalIR, ...] = ()
    ensemble_saves: tuple[SaveIR, ...] = ()  # `save ENSEMBLE to "dir"`: manifests, written after the plan runs
    warnings: tuple = ()  # the checker's warnings (Diagnostic), shown by check, compile and run


def map_expr(e: Expr, f) -> Expr:
    """Rebuild `e` bottom-up where `f(node)` returns a replacement (None keeps the node)."""
    r = f(e)
    if r is not None:
        return r
    updates = {}
    for name in type(e).model_fields:
        v = getattr(e, name)
        nv = _map_value(v, f)
        if nv is not v:
            updates[name] = nv
    return e.model_copy(update=updates) if updates else e


def _map_value(v, f):
    if isinstance(v, IR) and not isinstance(v, (ParamIR, DefIR, Binding, RuleIR)):
        return map_expr(v, f)
    if isinstance(v, tuple):
        items = tuple(_map_value(x, f) for x in v)
        return v if all(a is b for a, b in zip(items, v)) else items
    return v


def children(e: Expr) -> list[Expr]:
    """The direct sub-expressions of a node (call arguments, keyword values included)."""
    out: list[Expr] = []
    for name in type(e).model_fields:
        _collect(getattr(e, name), out)
    return out


def _collect(v, out: list) -> None:
    if isinstance(v, IR):
        out.append(v)
    elif isinstance(v, tuple):
        for x in v:
            _collect(x, out)


def walk_expr(e: Expr):
    """Every node of an expression tree, parents first."""
    yield e
    for c in children(e):
        yield from walk_expr(c)


# -- tune() calls: `tune(values, on=[...], split=...)` in a merge argument
def is_tune(e: Expr) -> bool:
    """Whether `e` is a call of the builtin tune()."""
    return isinstance(e, CallE) and e.kind == "builtin" and e.target == "tune"


TUNE_PARAMS = ("values", "on", "split", "budget", "sampler", "seed", "objectives", "pick")


def tune_args(call: CallE) -> dict[str, Expr]:
    """A tune() call's arguments by name: values, on, split and the search settings."""
    return dict(zip(TUNE_PARAMS, call.args)) | dict(call.kwargs)


def is_between(e: Expr) -> bool:
    """Whether `e` is a call of the builtin between(low, high, log=false): a search range."""
    return isinstance(e, CallE) and e.kind == "builtin" and e.target == "between"


def between_args(e: CallE) -> tuple[float, float, bool]:
    """(low, high, log) of a checked between() call."""
    a = dict(zip(("low", "high", "log"), e.args)) | dict(e.kwargs)
    log = a.get("log")
    return float(_number(a["low"])), float(_number(a["high"])), bool(log is not None and log.value)


def _number(e: Expr) -> float:
    """A checked literal number: a constant, or a negated one."""
    if isinstance(e, Neg):
        return -_number(e.operand)
    return e.value


def let_value(prog: Program, e: Expr) -> Expr:
    """The value of the `let` that `e` names, else `e` itself."""
    if isinstance(e, Ref) and e.scope == "global" and prog.bindings[e.name].kind == "let":
        return prog.bindings[e.name].value
    return e


def tune_values(prog: Program, call: CallE) -> tuple[Const, ...]:
    """The candidate constants of a tune(): its literal list, or the `let` it names; for a
    between() range, its two ends."""
    v = let_value(prog, tune_args(call)["values"])
    if is_between(v):
        return tuple(Const(span=v.span, type="number", value=x) for x in between_args(v)[:2])
    return v.items


def tune_range(prog: Program, call: CallE) -> CallE | None:
    """The between() a tune() searches, else None (a list of candidates)."""
    v = let_value(prog, tune_args(call)["values"])
    return v if is_between(v) else None


def tune_first_value(prog: Program, call: CallE) -> float:
    """The first candidate of a tune() (a range's low end): what `compile` plans (`run`
    substitutes the chosen one)."""
    return float(tune_values(prog, call)[0].value)
