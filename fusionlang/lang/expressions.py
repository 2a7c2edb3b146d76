"""Expressions: name resolution in scope, types, constant folding, calls checked against
`def` signatures, the op registry and the builtins. No torch."""

from __future__ import annotations

import math

from .. import ir
from ..ops import OPS
from . import ast
from .modules import Module, ModuleChecker
from .signatures import BUILTINS, REQUIRED, type_accepts
from .values import MAX_NESTING, PATH_BUILTINS, check_param_value, check_path_string, is_number


class ExprChecker(ModuleChecker):
    """Checks expressions and calls into typed IR."""

    def expr(self, e: ast.Expr, mod: Module, scope: dict[str, str]) -> ir.Expr:
        """Check one expression: its typed IR (errors go to the sink).

        Checking a name checks its definition first, so checking nests through chains of
        definitions; past MAX_NESTING levels that is an E006 (not a RecursionError)."""
        if self._nesting >= MAX_NESTING:
            if not self._too_deep:
                self._too_deep = True
                self.sink.error("E006", f"definitions nest too deep: more than {MAX_NESTING} levels of expressions "
                                "and names defined in terms of other names", e.span,
                                "shorten the chain of definitions (each `let`/`merge`/`def` that uses the next one "
                                "adds its depth)")
            return ir.Const(span=e.span, type="any", value=None)
        self._nesting += 1
        try:
            return self._expr(e, mod, scope)
        finally:
            self._nesting -= 1

    def _expr(self, e: ast.Expr, mod: Module, scope: dict[str, str]) -> ir.Expr:
        s = e.span
        if isinstance(e, ast.Number):
            if not math.isfinite(e.value):
                self.sink.error("E006", f"number {e.text} is too large: it overflows to infinity", s,
                                f"numbers must be at most about 1.8e308 (values that reach tensors: {FLOAT32_MAX:.4g})")
            return ir.Const(span=s, type="int" if e.value.is_integer() and "." not in e.text and "e" not in e.text.lower() else "number", value=e.value)
        if isinstance(e, ast.String):
            return ir.Const(span=s, type="string", value=e.value)
        if isinstance(e, ast.Bool):
            return ir.Const(span=s, type="bool", value=e.value)
        if isinstance(e, ast.NoneLit):
            return ir.Const(span=s, type="none", value=None)
        if isinstance(e, ast.Var):
            if e.name in scope:
                return ir.Ref(span=s, type=scope[e.name], name=e.name, scope="local")
            sym = self._lookup(mod, e.name)
            if sym is None:
                if e.name in OPS or e.name in BUILTINS:
                    self.sink.error("E005", f"'{e.name}' is a function; call it with ( )", s, f"e.g. {e.name}(...)")
                else:
                    self._unknown(mod, e.name, s, scope)
                return ir.Const(span=s, type="any", value=None)
            if sym.kind == "def":
                self.sink.error("E005", f"'{e.name}' is a function; call it with ( )", s, f"e.g. {e.name}(...)")
                return ir.Const(span=s, type="any", value=None)
            return ir.Ref(span=s, type=self._sym_type(sym), name=sym.qualname, scope="global")
        if isinstance(e, ast.ListExpr):
            items = tuple(self.expr(i, mod, scope) for i in e.items)
            types = {i.type for i in items} - {"any"}
            if not types:
                t = "any" if items else "list"
            elif types <= {"model"} or (self.__dict__.get("_in_slices") and types <= {"model", "slice"}):
                t = "models"  # in a slices() item, layer ranges of models merge like models
            elif types <= {"number", "int"}:
                t = "numbers"
            else:
                t = "list"
            if "models" in types:
                self.sink.error("E005", "a list of model lists is not supported", s,
                                "concatenate lists with a comprehension or list the models directly")
            return ir.ListE(span=s, type=t, items=items)
        if isinstance(e, ast.ListComp):
            it = self.expr(e.iterable, mod, scope)
            elem = {"models": "model", "numbers": "number"}.get(it.type, "any")
            if it.type not in ("models", "numbers", "list", "any"):
                self.sink.error("E005", f"cannot iterate over a {it.type}", e.iterable.span, "iterate over a list, e.g. `models`")
            body = self.expr(e.body, mod, {**scope, e.var: elem})
            t = {"model": "models", "number": "numbers", "int": "numbers", "any": "any"}.get(body.type, "list")
            return ir.Comp(span=s, type=t, body=body, var=e.var, iterable=it)
        if isinstance(e, ast.BinOp):
            left, right = self.expr(e.left, mod, scope), self.expr(e.right, mod, scope)
            out = ir.Bin(span=s, type=self._bin_type(e, left.type, right.type), op=e.op, left=left, right=right)
            self._fold_bin(out)
            return out
        if isinstance(e, ast.Neg):
            x = self.expr(e.operand, mod, scope)
            if isinstance(x, ir.Const) and x.type in ("number", "int"):
                return ir.Const(span=s, type=x.type, value=-x.value)
            if self.folded(x) is not None:
                out = ir.Neg(span=s, type=x.type, operand=x)
                self._folded[id(out)] = (out, -self.folded(x))
                return out
            if x.type not in ("model", "number", "int", "any"):
                self.sink.error("E005", f"cannot negate a {x.type}", s, "only numbers and models can be negated")
            return ir.Neg(span=s, type=x.type, operand=x)
        if isinstance(e, ast.Cond):
            test = self.expr(e.test, mod, scope)
            if not type_accepts("bool", test.type):
                self.sink.error("E005", f"condition must be a bool, not {test.type}", e.test.span,
                                "compare with == or !=, e.g. if x == 1 then ... else ...")
            a, b = self.expr(e.then, mod, scope), self.expr(e.other, mod, scope)
            t = a.type if a.type == b.type else ("number" if {a.type, b.type} <= {"int", "number"} else "any" if "any" in (a.type, b.type) else None)
            if t is None:
                self.sink.error("E005", f"branches have different types: {a.type} and {b.type}", s,
                                "both branches must give the same kind of value (e.g. two models)")
                t = "any"
            return ir.CondE(span=s, type=t, test=test, then=a, other=b)
        if isinstance(e, ast.Index):
            v, i = self.expr(e.value, mod, scope), self.expr(e.index, mod, scope)
            if not type_accepts("int", i.type):
                self.sink.error("E005", f"index must be an integer, not {i.type}", e.index.span, "e.g. experts[0]")
            elem = {"models": "model", "numbers": "number"}.get(v.type, "any")
            if v.type not in ("models", "numbers", "list", "any"):
                self.sink.error("E005", f"cannot index a {v.type}", e.value.span, "only lists can be indexed, e.g. experts[0]")
            return ir.IndexE(span=s, type=elem, value=v, index=i)
        if isinstance(e, ast.Call):
            return self._call(e, mod, scope)
        raise AssertionError(f"unhandled AST node {type(e).__name__}")

    def folded(self, x: ir.Expr) -> float | None:
        """The value of a number expression made only of literals and + - * / (folded
        as the lowering computes it), else None."""
        if isinstance(x, ir.Const):  # a literal that overflows is reported once, at itself
            return float(x.value) if is_number(x.value) and math.isfinite(x.value) else None
        entry = self._folded.get(id(x))
        return entry[1] if entry is not None and entry[0] is x else None

    def _fold_bin(self, b: ir.Bin) -> None:
        """Fold a constant number operation; one that overflows is an E006 at it. A model
        scaled by a constant beyond float32 is one too."""
        a, c = self.folded(b.left), self.folded(b.right)
        if b.op in ("==", "!="):
            return
        if a is not None and c is not None:
            if b.op == "/" and c == 0:
                return  # the lowering reports the division by zero
            v = {"+": lambda: a + c, "-": lambda: a - c, "*": lambda: a * c, "/": lambda: a / c}[b.op]()
            if not math.isfinite(v):
                self.sink.error("E006", f"this '{b.op}' overflows: {a:g} {b.op} {c:g} is {v:g}", b.span,
                                "numbers must stay finite (at most about 1.8e308)")
                return
            self._folded[id(b)] = (b, v)
            return
        k = c if b.left.type == "model" else a if b.right.type == "model" else None
        if k is not None and b.op == "/" and k != 0:
            k = 1.0 / k
        if k is not None and b.op in "*/" and math.isfinite(k) and abs(k) > FLOAT32_MAX:
            self.sink.error("E006", f"scale factor {k:g} is beyond float32 range", b.span,
                            f"a model can be scaled by at most ±{FLOAT32_MAX:.4g}")

    def _bin_type(self, e: ast.BinOp, lt: str, rt: str) -> str:
        num = {"number", "int"}
        if e.op in ("==", "!="):
            if "model" in (lt, rt) or "models" in (lt, rt):
                self.sink.error("E005", f"cannot compare models with '{e.op}'", e.span, "compare numbers, strings, bools or none")
            return "bool"
        if "any" in (lt, rt):
            return "model" if "model" in (lt, rt) else "any"
        if lt in num and rt in num:
            return "int" if lt == rt == "int" and e.op != "/" else "number"
        if e.op in "+-" and lt == rt == "model":
            return "model"
        if e.op == "*" and {lt, rt} <= {"model"} | num and "model" in (lt, rt):
            return "model"
        if e.op == "/" and lt == "model" and rt in num:
            return "model"
        hint = "arithmetic works on numbers, and on models: model + model, model * number, model / number"
        if "models" in (lt, rt):
            hint = "arithmetic works on single models; use a comprehension, e.g. [m - base for m in models], or sum(...)"
        elif e.op == "/" and rt == "model":
            hint = "a model can only be divided by a number"
        elif "string" in (lt, rt) or "bool" in (lt, rt):
            hint = "arithmetic works on models and numbers"
        self.sink.error("E005", f"cannot apply '{e.op}' to {lt} and {rt}", e.span, hint)
        return "any"

    def _call(self, e: ast.Call, mod: Module, scope: dict[str, str]) -> ir.Expr:
        s = e.span
        # NOTE: inside slices([...]) a merge of layers(m, start, end) ranges is a merged slice
        depth = self.__dict__.get("_in_slices", 0)
        self._in_slices = depth + (e.func == "slices")
        try:
            args = tuple(self.expr(a, mod, scope) for a in e.args)
            kwargs = tuple((k.name, self.expr(k.value, mod, scope), k.span) for k in e.kwargs)
        finally:
            self._in_slices = depth
        sym = None if e.func in scope else self._lookup(mod, e.func)
        if sym is not None and sym.kind != "def":
            hidden = self._lookup_imported(mod, e.func)
            self.sink.error("E005", f"'{e.func}' is a {sym.kind}, not a function", e.func_span,
                            f"the {sym.kind} defined at {sym.span} hides the function '{e.func}' from `use {hidden}`; rename it"
                            if hidden else f"the {sym.kind} '{e.func}' is defined at {sym.span}; call a def or a built-in")
            return ir.Const(span=s, type="any", value=None)
        if sym is not None:
            d = self._def(sym.qualname)
            if d is None:
                if sym.qualname in self._in_progress:
                    self.sink.error("E009", f"recursive call to '{e.func}'", e.func_span, "defs cannot call themselves")
                return ir.Const(span=s, type="any", value=None)
            sig = [(p.name, p.type, p.default if p.default is not None else REQUIRED) for p in d.params]
            self._bind_args(e, sig, args, kwargs, None)
            self._gradient_or_per_model(e, sig, args, kwargs)
            return ir.CallE(span=s, type=d.returns, kind="def", target=sym.qualname, args=args,
                            kwargs=tuple((k, v) for k, v, _ in kwargs))
        if e.func in OPS and OPS[e.func].public:
            o = OPS[e.func]
            sig = [(p.name, p.type, REQUIRED if p.required else p.default) for p in o.params]
            self._bind_args(e, sig, args, kwargs, o)
            return ir.CallE(span=s, type="model", kind="op", target=e.func, args=args,
                            kwargs=tuple((k, v) for k, v, _ in kwargs))
        if e.func in BUILTINS:
            b = BUILTINS[e.func]
            self._bind_args(e, list(b.params), args, kwargs, None, builtin=True)
            if e.func in PATH_BUILTINS:  # their strings become file names
                for a in args + tuple(v for _, v, _ in kwargs):
                    if isinstance(a, ir.Ref) and a.scope == "global" and a.name in self.bindings:
                        a = self.bindings[a.name].value  # a `let` holding the string: reported there
                    if isinstance(a, ir.Const) and isinstance(a.value, str) and a.span not in self._paths_seen:
                        self._paths_seen.add(a.span)  # a `let` used twice is reported once
                        check_path_string(self.sink, a.value, a.span)
            if e.func == "tune":
                self._check_tune(e, args, kwargs)
            elif e.func == "between":
                from .search_args import check_between

                call = ir.CallE(span=s, type="range", kind="builtin", target="between", args=args,
                                kwargs=tuple((k, v) for k, v, _ in kwargs))
                check_between(self.sink, call, self.folded)
            return ir.CallE(span=s, type=b.returns, kind="builtin", target=e.func, args=args,
                            kwargs=tuple((k, v) for k, v, _ in kwargs))
        self._unknown(mod, e.func, e.func_span, scope, called=True)
        return ir.Const(span=s, type="any", value=None)

    def _gradient_or_per_model(self, e: ast.Call, sig, args, kwargs) -> None:
        """W004 where a list of numbers for a parameter MergeKit sets per model (density,
        epsilon, gamma) has as many values as the call's list of models: it is a gradient
        over the layers, which a MergeKit user easily reads as one value per model."""
        bound = dict(zip((n for n, _, _ in sig), args)) | {k: v for k, v, _ in kwargs}
        counts = []
        for n, typ, _ in sig:
            a = bound.get(n)
            if typ == "models" and isinstance(a, ir.Ref) and a.scope == "global" and a.name in self.bindings:
                a = self.bindings[a.name].value
            if typ == "models" and isinstance(a, ir.ListE):
                counts.append(len(a.items))
        for n, typ, _ in sig:
            a = bound.get(n)
            if n in PER_MODEL_IN_MERGEKIT and typ == "number" and isinstance(a, ir.ListE) and len(a.items) >= 2 \
                    and len(a.items) in counts:
                k = len(a.items)
                self.sink.warning("W004", f"{n} has {k} values and there are {k} models, but a list for a number "
                                  "is a gradient over the layers (first layer to last), not one value per model",
                                  a.span, f"for one value per model write {n}=per_model([...]) "
                                  "(docs/language.md, \"Per-model values\")")

    def _check_tune(self, e: ast.Call, args, kwargs) -> None:
        """tune(values, on=[tasks]): literal candidates, declared tasks, only in a merge."""
        if not self._tune_ok:
            self.sink.error("E019", "tune() can only choose an argument of a merge", e.span,
                            "write it in the merge itself, e.g. merge ta = task_arithmetic(base, experts, "
                            "scale=tune([0.1, 0.3, 0.5], on=[task1, task2]))")
        bound = dict(zip((p[0] for p in BUILTINS["tune"].params), args)) | {k: v for k, v, _ in kwargs}
        values, on = bound.get("values"), bound.get("on")
        # either may name a `let` holding the list
        if isinstance(values, ir.Ref) and values.scope == "global" and values.name in self.bindings:
            values = self.bindings[values.name].value
        if isinstance(on, ir.Ref) and on.type != "task" and on.scope == "global" and on.name in self.bindings:
            on = self.bindings[on.name].value
        if ir.is_between(values):
            pass  # a search range: between() checked its bounds
        elif values is not None and values.type != "any":
            if not (isinstance(values, ir.ListE) and values.items
                    and all(isinstance(i, ir.Const) and i.type in ("number", "int") for i in values.items)):
                self.sink.error("E019", "tune() needs a literal list of candidate numbers or a between() range",
                                values.span, "e.g. tune([0.1, 0.2, 0.3, 0.5, 0.7, 1.0], on=[task1, task2]), or "
                                "tune(between(0.1, 1.0), on=[task1, task2], budget=16), or a `let` holding one")
            elif len({i.value for i in values.items}) != len(values.items):
                self.sink.error("E019", "tune() lists a candidate twice", values.span, "list each candidate once")
            else:
                for i in values.items:
                    if isinstance(i.value, bool):
                        self.sink.error("E005", "tune() candidates must be numbers", i.span, "e.g. tune([0.1, 0.3, 0.5], on=[task1])")
        if on is not None and on.type != "any":
            items = on.items if isinstance(on, ir.ListE) else (on,)
            if not items:
                self.sink.error("E019", "tune() needs at least one task to choose on", on.span,
                                "e.g. on=[austen, pos]")
            for i in items:
                if not (isinstance(i, ir.Ref) and i.type == "task"):
                    self.sink.error("E005", f"tune() chooses on tasks, not {type_name(i.type)}", i.span,
                                    'declare one with `task NAME = classify("NAME", zoo="text")`')
        from .search_args import check_search

        check_search(self.sink, bound, self.folded)
        split = bound.get("split")
        if isinstance(split, ir.Const) and split.value == "test":
            self.sink.warning("W002", "tune() chooses on the test split: the reported test accuracy is then "
                              "optimistic", split.span, 'choose on split="val" and report on "test"')

    def _bind_args(self, e: ast.Call, sig, args, kwargs, opdef, builtin: bool = False) -> None:
        names = [n for n, _, _ in sig]
        bound: dict[str, ir.Expr] = {}
        if len(args) > len(sig):
            self.sink.error("E004", f"'{e.func}' takes {len(sig)} argument{'s' * (len(sig) != 1)} but {len(args)} were given",
                            args[len(sig)].span, f"signature: {e.func}({', '.join(names)})")
        for (n, _, _), a in zip(sig, args):
            bound[n] = a
        for k, v, ks in kwargs:
            if k not in names:
                import difflib

                close = difflib.get_close_matches(k, names, n=1)
                self.sink.error("E004", f"'{e.func}' has no parameter '{k}'", ks,
                                f"did you mean '{close[0]}'?" if close else f"parameters: {', '.join(names)}")
            elif k in bound:
                self.sink.error("E004", f"'{k}' is given twice", ks, "give each argument once (by position or by name)")
            else:
                bound[k] = v
        for n, typ, default in sig:
            if n not in bound:
                if default is REQUIRED:
                    self.sink.error("E004", f"'{e.func}' is missing the argument '{n}'", e.span,
                                    f"signature: {e.func}({', '.join(names)})")
                continue
            a = bound[n]
            spec = next((p for p in opdef.params if p.name == n), None) if opdef else None
            if a.type == "none" and (default is None or (spec and spec.optional)):
                continue
            if a.type == "slice" and typ in ("model", "tensor") and self.__dict__.get("_in_slices"):
                continue  # a layer range merged in a slice (a merged slice)
            if not type_accepts(typ, a.type):
                hint = f"signature: {e.func}({', '.join(names)})"
                if typ in ("models", "tensors") and a.type == "model":
                    hint = f"wrap it in a list: [{arg_text(a)}]"
                elif typ == "model" and a.type == "models":
                    hint = "this parameter takes one model"
                self.sink.error("E005", f"argument '{n}' of '{e.func}' must be {type_name(typ)}, not {type_name(a.type)}", a.span, hint)
                continue
            if spec is not None and self.folded(a) is not None:
                self.check_value(n, e.func, spec.choices, spec.range, spec.type, self.folded(a), a.span)
            elif isinstance(a, ir.Const) and spec is not None and not (is_number(a.value) and not math.isfinite(a.value)):
                self.check_value(n, e.func, spec.choices, spec.range, spec.type, a.value, a.span)
            elif isinstance(a, ir.ListE) and spec is not None and spec.type in ("number", "int", "numbers"):
                for item in a.items:  # each point of a gradient, each weight
                    if self.folded(item) is not None:
                        self.check_value(n, e.func, spec.choices, spec.range, "number", self.folded(item), item.span)
            elif builtin and typ in ("number", "int") and a.type in ("numbers", "list"):
                self.sink.error("E005", f"argument '{n}' of '{e.func}' must be {type_name(typ)}, not {type_name(a.type)}", a.span,
                                f"{e.func}() takes a single number here, not a list")
            elif builtin and typ == "int" and self.folded(a) is not None and not self.folded(a).is_integer():
                self.sink.error("E005", f"argument '{n}' of '{e.func}' must be an integer, not {self.folded(a):g}", a.span,
                                "give a whole number, e.g. 2")
            else:
                for item in (a.items if isinstance(a, ir.ListE) else (a,)):
                    v = self.folded(item)
                    if v is not None and abs(v) > FLOAT32_MAX:
                        self.sink.error("E006", f"{n}={v:g} is beyond float32 range for {e.func}", item.span,
                                        f"numbers must be within ±{FLOAT32_MAX:.4g} (the range of float32)")

    def check_value(self, name, func, choices, rng, typ, value, span) -> None:
        check_param_value(self.sink, name, func, choices, rng, typ, value, span)


FLOAT32_MAX = 3.4028234663852886e38
# parameters MergeKit sets per model (a `models:` entry's `parameters:`), which a list in
# fusionlang does not mean (W004): `weight` is fusionlang's `weights=` list
PER_MODEL_IN_MERGEKIT = {"density", "epsilon", "gamma"}


def type_name(t: str) -> str:
    """A type as a message says it: "a list of models"."""
    return {"model": "a model", "models": "a list of models", "number": "a number", "int": "an integer",
            "string": "a string", "bool": "a bool", "numbers": "a list of numbers", "list": "a list",
            "tensor": "a model", "tensors": "a list of models", "none": "none", "function": "a function",
            "slice": "a layer range", "data": "a data value", "stats": "a list of statistics",
            "range": "a search range (between() belongs in tune())"}.get(t, t)


def arg_text(a: ir.Expr) -> str:
    """An argument as a message shows it: the name it refers to, else "..."."""
    return a.name.split("::")[-1] if isinstance(a, ir.Ref) else "..."
