"""Checks of constant values: op and builtin arguments (ranges, choices, finite and
within float32), path strings, and the depth bounds that keep checking, lowering and
formatting inside Python's recursion limit. No torch."""

from __future__ import annotations

import math
import os
import re

from .. import ir
from .diagnostics import DiagnosticSink, Span

# NOTE: checking, lowering and formatting walk expressions recursively: these bounds keep
# them well inside Python's recursion limit (the parser bounds one expression's depth).
MAX_NESTING = 150  # expressions nested while checking, through chains of definitions
MAX_EVAL_DEPTH = 250  # nesting of an evaluation (def bodies inlined at each call)

FLOAT32_MAX = 3.4028234663852886e38


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_param_value(sink: DiagnosticSink, name, func, choices, rng, typ, value, span) -> bool:
    """Validate one constant op argument; shared by the checker and the lowering.

    A number must be finite (NaN and ±inf are rejected explicitly: no comparison catches
    NaN), within the parameter's range if it has one, and within float32's range (the
    value reaches tensors). A list (a gradient over layers, or a `numbers` parameter) is
    checked point by point."""
    if choices and value not in choices:
        sink.error("E006", f"'{value}' is not a valid {name} for {func}", span,
                   f"choose one of: {', '.join(repr(c) for c in choices)}")
        return False
    if isinstance(value, (list, tuple)):
        return all(check_param_value(sink, name, func, None, rng, "number", v, span) for v in value if is_number(v))
    if rng and is_number(value):
        lo, hi = rng
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            sink.error("E006", f"{name}={value:g} is out of range for {func}", span, f"{name} must be in [{lo_s}, {hi_s}]")
            return False
    if is_number(value) and not math.isfinite(value):
        sink.error("E006", f"{name}={value:g} is not a finite number ({func})", span,
                   "numbers must be finite: NaN and infinity come from overflowing arithmetic such as 1e999 or 1e999 - 1e999")
        return False
    if is_number(value) and abs(value) > FLOAT32_MAX:
        sink.error("E006", f"{name}={value:g} is beyond float32 range for {func}", span,
                   f"values that reach tensors must be within ±{FLOAT32_MAX:.4g}")
        return False
    if typ == "int" and isinstance(value, float) and not value.is_integer():
        sink.error("E005", f"{name} of {func} must be an integer, not {value:g}", span, "give a whole number, e.g. 2")
        return False
    return True


def ir_children(x: ir.Expr) -> tuple:
    if isinstance(x, ir.ListE):
        return x.items
    if isinstance(x, ir.Comp):
        return (x.body, x.iterable)
    if isinstance(x, ir.Bin):
        return (x.left, x.right)
    if isinstance(x, ir.Neg):
        return (x.operand,)
    if isinstance(x, ir.CondE):
        return (x.test, x.then, x.other)
    if isinstance(x, ir.IndexE):
        return (x.value, x.index)
    if isinstance(x, ir.CallE):
        return x.args + tuple(v for _, v in x.kwargs)
    return ()


def eval_depth(x: ir.Expr, known: dict[str, int]) -> int:
    """How deep evaluating `x` nests, with the depths of the definitions it uses (a call
    counts two levels: its arguments are evaluated inside it)."""
    best, stack = 0, [(x, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, ir.CallE):
            d += 1
            if node.kind == "def":
                best = max(best, d + known.get(node.target, 0))
        elif isinstance(node, ir.Ref) and node.scope == "global":
            d += known.get(node.name, 0)
        best = max(best, d)
        stack.extend((c, d + 1) for c in ir_children(node))
    return best


PATH_BUILTINS = {"local", "hf", "zoo", "package", "classify", "dataset", "zoo_data", "lm_eval", "lora"}
NAME_MAX, PATH_MAX = 255, 4096  # bytes of one path component / a whole path (Linux)


def check_path_string(sink: DiagnosticSink, value: str, span: Span) -> bool:
    """A string that becomes a file or directory name: no NUL character, no component
    longer than NAME_MAX bytes, at most PATH_MAX bytes in all (E006 otherwise)."""
    if "\0" in value:
        sink.error("E006", "a path cannot contain a NUL character (\\u0000)", span,
                   "remove the NUL escape from the path")
        return False
    size = len(value.encode("utf-8", "surrogatepass"))
    longest = max((len(p.encode("utf-8", "surrogatepass")) for p in re.split(r"[/\\]", value)), default=0)
    if size > PATH_MAX or longest > NAME_MAX:
        what = f"{size} bytes (limit {PATH_MAX})" if size > PATH_MAX else \
            f"a name of {longest} bytes (limit {NAME_MAX} per directory or file name)"
        sink.error("E006", f"path too long: {what}", span, "use a shorter path")
        return False
    return True


def spec_path(spec_file: str, path: str) -> str:
    """An absolute path for a path string written in `spec_file`: `~` and `~user` expand
    to home directories (as in a shell), other relative paths are relative to the spec's
    directory."""
    return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(spec_file)), os.path.expanduser(path)))
