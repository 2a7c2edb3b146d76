"""Unresolved syntax tree: plain frozen dataclasses, every node carries a Span."""

from __future__ import annotations

from dataclasses import dataclass

from .diagnostics import Span


@dataclass(frozen=True)
class Node:
    span: Span


# ----- expressions -----------------------------------------------------------------


@dataclass(frozen=True)
class Number(Node):
    value: float
    text: str


@dataclass(frozen=True)
class String(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class NoneLit(Node):
    pass


@dataclass(frozen=True)
class Var(Node):
    name: str  # may be dotted: module.name


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class ListComp(Node):
    body: Expr
    var: str
    var_span: Span
    iterable: Expr


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # + - * /
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg(Node):
    operand: Expr


@dataclass(frozen=True)
class Cond(Node):
    test: Expr
    then: Expr
    other: Expr


@dataclass(frozen=True)
class Index(Node):
    value: Expr
    index: Expr


@dataclass(frozen=True)
class KwArg(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Call(Node):
    func: str  # may be dotted
    func_span: Span
    args: tuple[Expr, ...]
    kwargs: tuple[KwArg, ...]


Expr = Number | String | Bool | NoneLit | Var | ListExpr | ListComp | BinOp | Neg | Cond | Call | Index


# ----- statements ------------------------------------------------------------------


@dataclass(frozen=True)
class Use(Node):
    module: str  # dotted stdlib name or a path string
    is_path: bool
    alias: str | None


@dataclass(frozen=True)
class ModelDecl(Node):
    name: str
    plural: bool  # `models` declares a list
    value: Expr


@dataclass(frozen=True)
class Let(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Param(Node):
    name: str
    type: str | None
    default: Expr | None


@dataclass(frozen=True)
class Def(Node):
    name: str
    params: tuple[Param, ...]
    returns: str | None
    body: Expr


@dataclass(frozen=True)
class Rule(Node):
    pattern: str
    pattern_span: Span
    value: Expr


@dataclass(frozen=True)
class Merge(Node):
    name: str
    value: Expr
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Save(Node):
    name: str
    name_span: Span
    path: str
    path_span: Span
    dtype: str | None
    dtype_span: Span | None


@dataclass(frozen=True)
class TaskDecl(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class DataDecl(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class EnsembleDecl(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class Eval(Node):
    models: tuple[tuple[str, Span], ...]
    tasks: tuple[tuple[str, Span], ...]
    report: str | None
    report_span: Span | None


Stmt = Use | ModelDecl | Let | Def | Merge | Save | TaskDecl | DataDecl | EnsembleDecl | Eval


@dataclass(frozen=True)
class Module(Node):
    file: str
    stmts: tuple[Stmt, ...]


def children(e: Expr) -> tuple[Expr, ...]:
    """The sub-expressions of an expression (for walkers that must not recurse)."""
    if isinstance(e, ListExpr):
        return e.items
    if isinstance(e, ListComp):
        return (e.body, e.iterable)
    if isinstance(e, BinOp):
        return (e.left, e.right)
    if isinstance(e, Neg):
        return (e.operand,)
    if isinstance(e, Cond):
        return (e.test, e.then, e.other)
    if isinstance(e, Index):
        return (e.value, e.index)
    if isinstance(e, Call):
        return e.args + tuple(k.value for k in e.kwargs)
    return ()


def depth(e: Expr) -> tuple[int, Expr]:
    """How deep an expression nests (a literal or name is 1), and its deepest node;
    computed without recursion."""
    best, deepest = 0, e
    stack = [(e, 1)]
    while stack:
        node, d = stack.pop()
        if d > best:
            best, deepest = d, node
        stack.extend((c, d + 1) for c in children(node))
    return best, deepest


def stmt_exprs(s: Stmt) -> tuple[Expr, ...]:
    """The expressions a statement holds (its value, defaults, rule values)."""
    if isinstance(s, (ModelDecl, Let, TaskDecl, DataDecl, EnsembleDecl)):
        return (s.value,)
    if isinstance(s, Def):
        return tuple(p.default for p in s.params if p.default is not None) + (s.body,)
    if isinstance(s, Merge):
        return (s.value,) + tuple(r.value for r in s.rules)
    return ()
