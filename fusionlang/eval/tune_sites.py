"""The tune() calls of a program: where each is (`TuneSite`: its merge, the argument it
fills, its candidates or range, its tasks and search settings), the program with chosen
values substituted, and the record of a choice (`TuneRecord`, stored in report.json).
Shared by the grid (`eval.tuning`) and the search (`eval.search`). No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import ir

SpanKey = tuple[str, int, int]


@dataclass
class TuneSite:
    merge: str  # qualified name of the merge whose expression holds the tune()
    call: ir.CallE
    param: str  # the argument it fills, for reports ("scale")
    values: list[float]
    tasks: list[str]  # qualified task names
    split: str
    range: tuple[float, float, bool] | None = None  # between(low, high, log): a searched range
    settings: dict = field(default_factory=dict)  # search settings given here: name -> (value, span)

    @property
    def key(self) -> SpanKey:
        return span_key(self.call.span)


@dataclass
class TuneRecord:
    merge: str
    split: str
    tasks: list[str]
    params: list[str]
    candidates: list[dict] = field(default_factory=list)  # {"values": {...}, "accuracy": {...}, "average": x}
    chosen: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. the choice is at the edge of its grid
    search: dict | None = None  # a search's settings, counts and Pareto front (eval.search)

    def to_json(self) -> dict:
        out = {"merge": self.merge, "split": self.split, "tasks": self.tasks, "params": self.params,
               "candidates": self.candidates, "chosen": self.chosen}
        if self.search is not None:
            out["search"] = self.search
        if self.notes:
            out["notes"] = self.notes
        return out


def span_key(span) -> SpanKey:
    return (span.file, span.line, span.col)


def find_sites(prog: ir.Program) -> list[TuneSite]:
    """Every tune() of the program's merges, in binding order."""
    from ..plan.values import param_names

    sites = []
    for q, b in prog.bindings.items():
        if b.kind != "merge":
            continue
        for root in (b.value, *(r.value for r in b.rules)):
            params: dict[SpanKey, str] = {}  # the argument each tune() fills, where it is one
            for node in ir.walk_expr(root):
                if isinstance(node, ir.CallE) and not ir.is_tune(node):
                    for name, arg in list(zip(param_names(prog, node), node.args)) + list(node.kwargs):
                        for key, label in _filled(name, arg):
                            params.setdefault(key, label)
            for node in ir.walk_expr(root):
                if ir.is_tune(node):
                    a = ir.tune_args(node)
                    on = ir.let_value(prog, a["on"])
                    on = on.items if isinstance(on, ir.ListE) else (on,)
                    split = a.get("split")
                    rng = ir.tune_range(prog, node)
                    settings = {k: (_literal(a[k]), a[k].span) for k in ir.TUNE_PARAMS[3:]
                                if k in a and a[k].type != "none"}
                    sites.append(TuneSite(q, node, params.get(span_key(node.span), "value"),
                                          [float(i.value) for i in ir.tune_values(prog, node)],
                                          [t.name for t in on], split.value if split is not None else "val",
                                          ir.between_args(rng) if rng is not None else None, settings))
    _name_apart(sites)
    return sites


def _filled(name: str, arg: ir.Expr) -> list[tuple[SpanKey, str]]:
    """The tune()s an argument holds, each with its name in reports: `scale` (the whole
    argument), `scale[1]` (a point of a gradient list), `scale.start` (an end of a ramp())."""
    if ir.is_tune(arg):
        return [(span_key(arg.span), name)]
    if isinstance(arg, ir.ListE):
        return [(span_key(a.span), f"{name}[{i}]") for i, a in enumerate(arg.items) if ir.is_tune(a)]
    if isinstance(arg, ir.CallE) and arg.kind == "builtin" and arg.target == "ramp":
        ends = dict(zip(("start", "end"), arg.args)) | dict(arg.kwargs)
        return [(span_key(a.span), f"{name}.{k}") for k, a in ends.items() if ir.is_tune(a)]
    return []


def _literal(e: ir.Expr):
    """A checked literal setting: a number, a string, or a list of strings."""
    if isinstance(e, ir.ListE):
        return [i.value for i in e.items]
    return e.value if isinstance(e, ir.Const) else -e.operand.value


def _name_apart(sites: list[TuneSite]) -> None:
    """Two tune()s of one merge filling the same parameter (the points of a gradient
    `scale=[tune(...), tune(...)]`, or a rule's argument) are named `scale[0]`, `scale[1]`."""
    seen: dict[tuple[str, str], list[TuneSite]] = {}
    for s in sites:
        seen.setdefault((s.merge, s.param), []).append(s)
    for group in seen.values():
        if len(group) > 1:
            for i, s in enumerate(group):
                s.param = f"{s.param}[{i}]"


def substitute(prog: ir.Program, chosen: dict[SpanKey, float]) -> ir.Program:
    """The program with the tune() calls in `chosen` replaced by their values."""
    if not chosen:
        return prog

    def repl(e):
        if ir.is_tune(e) and span_key(e.span) in chosen:
            return ir.Const(span=e.span, type="number", value=chosen[span_key(e.span)])
        return None

    bindings = {}
    for q, b in prog.bindings.items():
        if b.kind == "merge":
            b = b.model_copy(update={
                "value": ir.map_expr(b.value, repl),
                "rules": tuple(r.model_copy(update={"value": ir.map_expr(r.value, repl)}) for r in b.rules)})
        bindings[q] = b
    return prog.model_copy(update={"bindings": bindings})
