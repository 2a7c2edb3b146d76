"""`fusionlang fmt`: print a spec in canonical form (idempotent, keeps comments)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from lark import Lark

from . import ast
from .diagnostics import SOURCES
from .parser import parse, to_ast

WIDTH = 100
_PREC = {"cond": 0, "==": 1, "!=": 1, "+": 2, "-": 2, "*": 3, "/": 3, "neg": 4, "postfix": 5, "atom": 6}


_NON_ASSOC = {"==", "!="}  # `sum_expr == sum_expr`: neither side may be another comparison


def _left_need(op: str) -> int:
    """The precedence a left operand needs to print without parentheses: a left-associative
    operator takes its own level on the left, a non-chaining one (== !=) does not."""
    return _PREC[op] + 1 if op in _NON_ASSOC else _PREC[op]


def _prec(e: ast.Expr) -> int:
    if isinstance(e, ast.Cond):
        return 0
    if isinstance(e, ast.BinOp):
        return _PREC[e.op]
    if isinstance(e, ast.Neg):
        return 4
    if isinstance(e, (ast.Call, ast.Index)):
        return 5
    return 6


def _string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def expr(e: ast.Expr, need: int = 0) -> str:
    text = _expr(e)
    return f"({text})" if _prec(e) < need else text


def _expr(e: ast.Expr) -> str:
    if isinstance(e, ast.Number):
        return e.text
    if isinstance(e, ast.String):
        return _string(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.NoneLit):
        return "none"
    if isinstance(e, ast.Var):
        return e.name
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(expr(i) for i in e.items) + "]"
    if isinstance(e, ast.ListComp):
        return f"[{expr(e.body)} for {e.var} in {expr(e.iterable)}]"
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        return f"{expr(e.left, _left_need(e.op))} {e.op} {expr(e.right, p + 1)}"
    if isinstance(e, ast.Neg):
        return "-" + expr(e.operand, 4)
    if isinstance(e, ast.Cond):
        return f"if {expr(e.test, 1)} then {expr(e.then)} else {expr(e.other)}"
    if isinstance(e, ast.Index):
        return f"{expr(e.value, 5)}[{expr(e.index)}]"
    if isinstance(e, ast.Call):
        args = [expr(a) for a in e.args] + [f"{k.name}={expr(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    raise AssertionError(type(e))


def pretty(e: ast.Expr, indent: str, col: int, need: int = 0) -> str:
    """Width-aware form: one line when it fits, else calls and lists break one item per
    line and conditionals break into if / then / else lines."""
    one = expr(e, need)
    if col + len(one) <= WIDTH:
        return one
    inner = indent + "    "
    if _prec(e) < need:
        return "(" + pretty(e, indent, col + 1) + ")"
    if isinstance(e, (ast.Call, ast.ListExpr)):
        items = list(e.args if isinstance(e, ast.Call) else e.items)
        parts = [pretty(a, inner, len(inner)) for a in items]
        if isinstance(e, ast.Call):
            parts += [f"{k.name}=" + pretty(k.value, inner, len(inner) + len(k.name) + 1) for k in e.kwargs]
        opening, closing = (f"{e.func}(", ")") if isinstance(e, ast.Call) else ("[", "]")
        if not parts:
            return one
        return opening + "\n" + "".join(f"{inner}{p},\n" for p in parts) + indent + closing
    if isinstance(e, ast.ListComp):
        return f"[\n{inner}{pretty(e.body, inner, len(inner))}\n{inner}for {e.var} in {expr(e.iterable)}\n{indent}]"
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        left = pretty(e.left, indent, col, _left_need(e.op))
        last = len(left.rsplit("\n", 1)[-1]) if "\n" in left else col + len(left)
        return f"{left} {e.op} " + pretty(e.right, indent, last + len(e.op) + 2, p + 1)
    if isinstance(e, ast.Cond):
        lines, cur, first = [], e, True
        while isinstance(cur, ast.Cond):
            kw = "if" if first else "else if"
            lead = "" if first else indent
            lines.append(f"{lead}{kw} {pretty(cur.test, indent, len(indent) + len(kw) + 1, 1)}")
            lines.append(f"{indent}then {pretty(cur.then, indent, len(indent) + 5)}")
            cur, first = cur.other, False
        lines.append(f"{indent}else {pretty(cur, indent, len(indent) + 5)}")
        return "\n".join(lines)
    return one


def _body(prefix: str, e: ast.Expr, indent: str = "") -> str:
    """`prefix` + expression, broken after `=` onto an indented line when too long."""
    if len(indent + prefix + expr(e)) <= WIDTH:
        return prefix + expr(e)
    head = prefix.rstrip()
    hang = isinstance(e, (ast.Call, ast.ListExpr)) and not prefix.startswith("def ")
    if not head.endswith(("=", "=>")) or hang:
        return prefix + pretty(e, indent, len(indent + prefix))
    inner = indent + "    "
    return f"{head}\n{inner}" + pretty(e, inner, len(inner))


def _param(p: ast.Param) -> str:
    s = p.name + (f": {p.type}" if p.type else "")
    return s + (f" = {expr(p.default)}" if p.default is not None else "")


def stmt(s: ast.Stmt) -> str:
    if isinstance(s, ast.Use):
        target = _string(s.module) if s.is_path else s.module
        return f"use {target}" + (f" as {s.alias}" if s.alias else "")
    if isinstance(s, ast.ModelDecl):
        return _body(f"{'models' if s.plural else 'model'} {s.name} = ", s.value)
    if isinstance(s, ast.Let):
        return _body(f"let {s.name} = ", s.value)
    if isinstance(s, ast.Def):
        ret = f" -> {s.returns}" if s.returns else ""
        head = f"def {s.name}({', '.join(_param(p) for p in s.params)}){ret} = "
        if len(head) > WIDTH:
            head = f"def {s.name}(\n" + "".join(f"    {_param(p)},\n" for p in s.params) + f"){ret} = "
        return _body(head, s.body)
    if isinstance(s, ast.TaskDecl):
        return _body(f"task {s.name} = ", s.value)
    if isinstance(s, ast.DataDecl):
        return _body(f"data {s.name} = ", s.value)
    if isinstance(s, ast.EnsembleDecl):
        return _body(f"ensemble {s.name} = ", s.value)
    if isinstance(s, ast.Eval):
        return (f"eval {', '.join(n for n, _ in s.models)} on {', '.join(n for n, _ in s.tasks)}"
                + (f" to {_string(s.report)}" if s.report is not None else ""))
    if isinstance(s, ast.Save):
        return f"save {s.name} to {_string(s.path)}" + (f" as {s.dtype}" if s.dtype else "")
    raise AssertionError(type(s))


class _Formatter:
    def __init__(self, comments: list[tuple[int, str]]):
        self.comments = comments  # (line, text), in order
        self.i = 0

    def take_before(self, line: int) -> list[str]:
        return [text for _, text in self.take_lines_before(line)]

    def take_lines_before(self, line: int) -> list[tuple[int, str]]:
        """The comments before `line` not yet placed, with their lines."""
        out = []
        while self.i < len(self.comments) and self.comments[self.i][0] < line:
            out.append(self.comments[self.i])
            self.i += 1
        return out

    def take_on(self, line: int) -> str:
        if self.i < len(self.comments) and self.comments[self.i][0] == line:
            self.i += 1
            return "  " + self.comments[self.i - 1][1]
        return ""

    def item(self, text: str, start: int, end: int, indent: str = "") -> list[str]:
        lines = [indent + c for c in self.take_before(start)]
        inner = self.take_before(end)  # comments inside a multi-line item move above it
        lines += [indent + c for c in inner]
        lines.append(indent + text + self.take_on(end))
        return lines


def format_module(mod: ast.Module, comments: list[tuple[int, str]], blank_before: set[int]) -> str:
    f = _Formatter(comments)
    out: list[str] = []
    for s in mod.stmts:
        lead_lines = f.take_lines_before(s.span.line)
        lead = [text for _, text in lead_lines]
        if out and (s.span.line in blank_before or (lead_lines and lead_lines[0][0] in blank_before)
                    or isinstance(s, ast.Def)):
            out.append("")
        out += lead
        if isinstance(s, ast.Merge):
            head = _body(f"merge {s.name} = ", s.value)
            if not s.rules:
                out += f.item(head, s.span.line, s.span.end_line)
                continue
            out.append(head + " {" + f.take_on(s.value.span.end_line))
            for r in s.rules:
                out += f.item(_body(f"{_string(r.pattern)} => ", r.value, "    "), r.span.line, r.span.end_line, "    ")
            out += ["    " + c for c in f.take_before(s.span.end_line)]
            out.append("}" + f.take_on(s.span.end_line))
        else:
            out += f.item(stmt(s), s.span.line, s.span.end_line)
    tail = f.take_before(1 << 30)
    if tail:
        out += [""] + tail if out else tail
    text = "\n".join(out).strip("\n")
    return text + "\n" if text else ""


_fmt_comments: list = []


@lru_cache(maxsize=1)
def _fmt_parser() -> Lark:
    grammar = resources.files("fusionlang.grammar").joinpath("fuse.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True,
                lexer_callbacks={"COMMENT": _fmt_comments.append})


def format_source(text: str, file: str = "<string>") -> str:
    """Canonical form of a spec; raises FuseErrors on a syntax error."""
    from lark.exceptions import UnexpectedInput

    SOURCES.add(file, text)
    _fmt_comments.clear()
    try:
        tree = _fmt_parser().parse(text)
    except UnexpectedInput:
        parse(text, file)  # raises FuseErrors with every syntax error, as `check` reports them
        raise AssertionError("the formatting grammar rejected what the parser accepts") from None
    mod = to_ast(tree, file)
    comments = [(c.line, str(c).rstrip()) for c in _fmt_comments]
    lines = text.split("\n")  # as the parser counts lines
    blank_before = {i + 1 for i in range(1, len(lines)) if not lines[i - 1].strip()}
    return format_module(mod, comments, blank_before)
