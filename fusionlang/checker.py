"""Resolve and check: AST modules -> typed IR `Program`.

Resolves names across `use`d modules (stdlib or spec files), infers and checks types,
validates calls against `def` signatures and the op registry (argument names, counts,
types, `Literal` choices, ranges of constants). Reports every error of a file at once.
Needs no model files and never imports torch.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from . import ast, ir
from .diagnostics import DiagnosticSink, FuseErrors, Span
from .ops import OPS
from .parser import parse, read_source

ENTRY = "spec"
# NOTE: checking, lowering and formatting walk expressions recursively: these bounds keep
# them well inside Python's recursion limit (the parser bounds one expression's depth).
MAX_NESTING = 150  # expressions nested while checking, through chains of definitions
MAX_EVAL_DEPTH = 250  # nesting of an evaluation (def bodies inlined at each call)
STDLIB_FILES = {"merging"}


@dataclass(frozen=True)
class BuiltinSig:
    params: tuple[tuple[str, str, object], ...]  # (name, type, default or REQUIRED)
    returns: str
    doc: str


REQUIRED = object()
BUILTINS: dict[str, BuiltinSig] = {
    "local": BuiltinSig((("path", "string", REQUIRED),), "model",
                        "a model directory: config.json + *.safetensors (relative to the spec file)"),
    "hf": BuiltinSig((("repo", "string", REQUIRED), ("revision", "string", None)), "model",
                     "a model from the local Hugging Face cache (never downloaded)"),
    "zoo": BuiltinSig((("zoo", "string", REQUIRED), ("model", "string", "base")), "model",
                      "a model of a built zoo (`fusionlang zoo build NAME`): its base or a task's fine-tuned expert"),
    "package": BuiltinSig((("package", "string", REQUIRED), ("path", "string", "")), "model",
                          "a model directory shipped inside an installed Python package (its import name)"),
    "ramp": BuiltinSig((("start", "number", REQUIRED), ("end", "number", REQUIRED)), "number",
                       "a value interpolated linearly over the layer index (a MergeKit gradient)"),
    "layers": BuiltinSig((("model", "model", REQUIRED), ("start", "int", REQUIRED), ("end", "int", REQUIRED)),
                         "slice", "layers [start, end) of a model, for slices()"),
    "slices": BuiltinSig((("parts", "list", REQUIRED),), "model",
                         "stack layer ranges of models into a new model (passthrough)"),
    "classify": BuiltinSig((("task", "string", REQUIRED), ("zoo", "string", "text"), ("split", "string", "test"),
                            ("batch_size", "int", 128), ("limit", "int", None)), "task",
                           "a classification task of a model zoo: its data split, frozen head and accuracy"),
    "tune": BuiltinSig((("values", "numbers", REQUIRED), ("on", "any", REQUIRED), ("split", "string", "val")), "number",
                       "a merge argument chosen at run time: the candidate with the best mean accuracy on the "
                       "tasks' validation split"),
}

_TYPE_OK = {
    "model": {"model"},
    "models": {"models"},
    "number": {"number", "int", "numbers"},  # a list of numbers is a gradient over layers
    "int": {"int", "number"},
    "string": {"string"},
    "bool": {"bool"},
    "numbers": {"numbers", "list"},
    "list": {"list", "numbers", "models"},
    "any": None,
    "tensor": {"model"},
    "tensors": {"models"},
    "task": {"task"},
}


def type_accepts(expected: str, actual: str) -> bool:
    if actual == "any" or expected == "any":
        return True
    ok = _TYPE_OK.get(expected)
    return ok is None or actual in ok


def pattern_regex(pattern: str) -> tuple[str, tuple[str, ...]]:
    """Glob over tensor names -> regex. `*` spans dots; `{i}` captures a layer index.
    A pattern matches a whole name or a dot-separated suffix of it."""
    out, caps, pos = [], [], 0
    for m in re.finditer(r"\*|\{([A-Za-z_][A-Za-z0-9_]*)\}", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        if m.group(0) == "*":
            out.append(".*")
        else:
            name = m.group(1)
            out.append(f"(?P<{name}>\\d+)" if name not in caps else f"(?P={name})")
            caps.append(name)
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return "(?:^|.*\\.)" + "".join(out) + "$", tuple(dict.fromkeys(caps))


@dataclass
class _Sym:
    kind: str  # model | models | let | merge | def
    qualname: str
    span: Span


@dataclass
class _Module:
    key: str
    file: str
    tree: ast.Module
    names: dict[str, _Sym] = field(default_factory=dict)
    qualified: dict[str, dict[str, _Sym]] = field(default_factory=dict)  # alias -> names


def stdlib_path(name: str) -> Path | None:
    res = resources.files("fusionlang.stdlib").joinpath(f"{name}.fuse")
    return Path(str(res)) if res.is_file() else None


def stdlib_modules() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fusionlang.stdlib").iterdir() if p.name.endswith(".fuse"))


class Checker:
    def __init__(self) -> None:
        self.sink = DiagnosticSink()
        self.modules: dict[str, _Module] = {}
        self.bindings: dict[str, ir.Binding] = {}
        self.defs: dict[str, ir.DefIR] = {}
        self._def_ast: dict[str, tuple[ast.Def, _Module]] = {}
        self._bind_ast: dict[str, tuple[ast.Stmt, _Module]] = {}
        self._in_progress: set[str] = set()
        self._failed: set[str] = set()
        self._had_errors: set[str] = set()  # bindings and defs whose checking reported an error
        self.partial: ir.Program | None = None  # on errors: the program without what had them
        self._loading: list[str] = []
        self._use_spans: list[Span] = []
        self._tune_ok = False  # tune() may appear only in the expression of a merge
        self._folded: dict[int, tuple[ir.Expr, float]] = {}
        self._paths_seen: set[Span] = set()
        self._order: list[str] = []  # bindings and defs in the order their checks finished
        self._nesting = 0  # expressions being checked, through definitions
        self._too_deep = False  # id -> (node, value) of folded number expressions

    @contextmanager
    def _tune_allowed(self, allowed: bool):
        """Check an expression where tune() is (a merge, its rules) or is not (a def,
        a let) allowed; the previous setting comes back afterwards."""
        saved, self._tune_ok = self._tune_ok, allowed
        try:
            yield
        finally:
            self._tune_ok = saved

    # ------------------------------------------------------------------ modules

    def load(self, key: str, file: str, text: str, use_span: Span | None = None) -> _Module | None:
        if key in self.modules:
            return self.modules[key]
        try:
            tree = parse(text, file)
        except FuseErrors as e:
            self.sink.items.extend(e.diagnostics)
            return None
        mod = _Module(key, file, tree)
        self.modules[key] = mod
        self._loading.append(key)
        for stmt in tree.stmts:
            if isinstance(stmt, ast.Use):
                self._use(mod, stmt)
        for stmt in tree.stmts:
            self._declare(mod, stmt)
        self._loading.pop()
        return mod

    def _use(self, mod: _Module, stmt: ast.Use) -> None:
        if stmt.is_path and not check_path_string(self.sink, stmt.module, stmt.span):
            return
        if stmt.is_path:
            path = (Path(mod.file).parent / stmt.module).resolve()
            key = str(path)
            if not path.is_file():
                self.sink.error("E008", f"cannot find spec file '{stmt.module}'", stmt.span,
                                f"looked for {os.path.relpath(path)} (relative to the file that uses it)")
                return
            alias = stmt.alias or path.stem
        else:
            p = stdlib_path(stmt.module)
            if p is None:
                self.sink.error("E008", f"unknown module '{stmt.module}'", stmt.span,
                                f"stdlib modules: {', '.join(stdlib_modules())}; use \"file.fuse\" for a spec file")
                return
            path, key, alias = p, "std:" + stmt.module, stmt.alias or stmt.module
        if key in self._loading:
            start = self._loading.index(key)
            chain = " -> ".join(self._display(k) for k in self._loading[start:] + [key])
            # NOTE: reported at the `use` in the module where the cycle starts (for the
            # entry file: its own line), not deep inside the other file.
            span = self._use_spans[start] if start < len(self._use_spans) else stmt.span
            self.sink.error("E007", f"cyclic use: {chain}", span, "break the cycle by moving shared definitions into a third file")
            return
        file = str(path) if key.startswith("std:") else os.path.relpath(path)
        try:
            text = read_source(file)
        except FuseErrors as e:
            for d in e.diagnostics:  # a file that is not UTF-8: located in that file
                self.sink.error(d.code, d.message, d.span if d.code == "E001" else stmt.span, d.hint)
            return
        self._use_spans.append(stmt.span)
        used = self.load(key, file, text, stmt.span)
        self._use_spans.pop()
        if used is None:
            return
        exported = {n: s for n, s in used.names.items() if not n.startswith("_")}
        mod.qualified[alias] = exported
        for n, s in exported.items():
            mod.names.setdefault(n, s)

    def _display(self, key: str) -> str:
        return key[4:] if key.startswith("std:") else os.path.relpath(key) if os.path.isabs(key) else key

    def _declare(self, mod: _Module, stmt: ast.Stmt) -> None:
        if isinstance(stmt, (ast.Use, ast.Save, ast.Eval)):
            return
        name = stmt.name
        kind = {ast.Def: "def", ast.Let: "let", ast.Merge: "merge", ast.TaskDecl: "task"}.get(type(stmt))
        if isinstance(stmt, ast.ModelDecl):
            kind = "models" if stmt.plural else "model"
        qual = f"{mod.key}::{name}"
        prev = mod.names.get(name)
        if prev is not None and prev.qualname.startswith(mod.key + "::"):
            self.sink.error("E003", f"'{name}' is already defined", stmt.span,
                            f"first defined at {prev.span}; pick another name")
            return
        if name in OPS or name in BUILTINS:
            self.sink.warning("W001", f"'{name}' shadows a built-in", stmt.span,
                              f"the built-in '{name}' cannot be called in this file; pick another name")
        mod.names[name] = _Sym(kind, qual, stmt.span)
        if kind == "def":
            self._def_ast[qual] = (stmt, mod)
        else:
            self._bind_ast[qual] = (stmt, mod)

    # ------------------------------------------------------------------ program
    def check_program(self, file: str, text: str) -> ir.Program | None:
        mod = self.load(str(Path(file).resolve()), file, text)
        if mod is None:
            return None
        for qual in list(self._def_ast):
            self._def(qual)
        for qual in list(self._bind_ast):
            self._binding(qual)
        self._check_eval_depth()
        saves, evals = [], []
        seen_paths: dict[str, Span] = {}
        for stmt in mod.tree.stmts:
            if isinstance(stmt, ast.Save):
                s = self._save(mod, stmt, seen_paths)
                if s:
                    saves.append(s)
            elif isinstance(stmt, ast.Eval):
                ev = self._eval(mod, stmt)
                if ev:
                    evals.append(ev)
        if self.sink.errors:
            # NOTE: what checked cleanly can still be value-checked by the lowering (so a
            # file's errors are all reported at once); what had errors is left out.
            self.partial = ir.Program(file=file, text=text, module=mod.key,
                                      bindings={q: b for q, b in self.bindings.items() if q not in self._had_errors},
                                      defs={q: d for q, d in self.defs.items() if q not in self._had_errors},
                                      saves=(), evals=())
            return None
        return ir.Program(file=file, text=text, module=mod.key, bindings=self.bindings, defs=self.defs, saves=tuple(saves),
                          evals=tuple(evals))

    def _check_eval_depth(self) -> None:
        """E006 when evaluating a definition would nest deeper than MAX_EVAL_DEPTH: the
        lowering evaluates a name's definition, and a def's body at each call, inside the
        expression that uses it. Computed without recursion, in the order the checks
        finished (what a definition uses finished before it)."""
        depth: dict[str, int] = {}
        for qual in self._order:
            if qual in self.defs:
                d = self.defs[qual]
                exprs, span = [d.body] + [p.default for p in d.params if p.default is not None], d.span
            else:
                b = self.bindings[qual]
                exprs, span = [b.value] + [r.value for r in b.rules], b.span
            n = max(_eval_depth(x, depth) for x in exprs)
            depth[qual] = n
            if n > MAX_EVAL_DEPTH:
                self._had_errors.add(qual)  # left out of the partial program the lowering checks
            if n > MAX_EVAL_DEPTH and not self._too_deep:
                self._too_deep = True
                name = qual.split("::")[-1]
                self.sink.error("E006", f"'{name}' nests too deep: evaluating it nests {n} levels, through the "
                                f"definitions it uses (limit {MAX_EVAL_DEPTH})", span,
                                "shorten the chain of definitions it uses, or split its expression")

    def _save(self, mod: _Module, stmt: ast.Save, seen: dict[str, Span]) -> ir.SaveIR | None:
        sym = mod.names.get(stmt.name)
        if sym is None:
            self._unknown(mod, stmt.name, stmt.name_span, {})
            return None
        if sym.kind not in ("merge", "model"):
            self.sink.error("E005", f"cannot save '{stmt.name}': it is a {sym.kind}, not a model", stmt.name_span,
                            "save takes a merge or a model")
            return None
        if stmt.dtype is not None and stmt.dtype not in ("bf16", "fp16", "fp32"):
            self.sink.error("E006", f"unknown dtype '{stmt.dtype}'", stmt.dtype_span or stmt.span, "use bf16, fp16 or fp32")
            return None
        if not stmt.path.strip():
            self.sink.error("E016", "empty output path", stmt.path_span, "give a directory to write the model to")
            return None
        if not check_path_string(self.sink, stmt.path, stmt.path_span):
            return None
        path = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(mod.file)), stmt.path))
        if path in seen:
            self.sink.error("E016", f"two saves write to '{stmt.path}'", stmt.path_span, f"the other save is at {seen[path]}")
            return None
        seen[path] = stmt.span
        return ir.SaveIR(name=sym.qualname, display=stmt.name, path=path, dtype=stmt.dtype, span=stmt.span,
                         path_span=stmt.path_span)

    def _eval(self, mod: _Module, stmt: ast.Eval) -> ir.EvalIR | None:
        models, tasks, ok = [], [], True
        for names, want, out in ((stmt.models, ("model", "merge", "models"), models), (stmt.tasks, ("task",), tasks)):
            for name, span in names:
                sym = mod.names.get(name)
                if sym is None:
                    self._unknown(mod, name, span, {})
                    ok = False
                elif sym.kind not in want:
                    what = "a model or merge" if "model" in want else "a task"
                    self.sink.error("E005", f"'{name}' is a {sym.kind}, not {what}", span,
                                    "eval MODELS on TASKS: models first, then tasks declared with `task NAME = classify(...)`")
                    ok = False
                else:
                    out.append(sym.qualname)
        report = None
        if stmt.report is not None and not check_path_string(self.sink, stmt.report, stmt.report_span or stmt.span):
            ok = False
        elif stmt.report is not None:
            report = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(mod.file)), stmt.report))
        return ir.EvalIR(models=tuple(models), tasks=tuple(tasks), report=report, span=stmt.span) if ok else None

    def _def(self, qual: str) -> ir.DefIR | None:
        if qual in self.defs:
            return self.defs[qual]
        if qual in self._in_progress:
            return None  # recursion is reported by the caller
        d, mod = self._def_ast[qual]
        self._in_progress.add(qual)
        n_errors = len(self.sink.errors)
        try:
            with self._tune_allowed(False):
                return self._def_body(qual, d, mod)
        finally:
            if len(self.sink.errors) > n_errors:
                self._had_errors.add(qual)

    def _def_body(self, qual: str, d: ast.Def, mod: _Module) -> ir.DefIR:
        params, scope = [], {}
        seen = set()
        for p in d.params:
            if p.name in seen:
                self.sink.error("E003", f"duplicate parameter '{p.name}'", p.span, "give each parameter its own name")
            seen.add(p.name)
            default = self.expr(p.default, mod, {}) if p.default is not None else None
            typ = p.type or (default.type if default is not None and default.type != "none" else "any")
            if p.type and default is not None and default.type != "none" and not type_accepts(p.type, default.type):
                self.sink.error("E005", f"default of '{p.name}' is {default.type}, not {p.type}", p.default.span,
                                f"give a default of type {p.type}, or change the declared type")
            params.append(ir.ParamIR(name=p.name, type=typ, default=default, span=p.span))
            scope[p.name] = typ
        body = self.expr(d.body, mod, scope)
        ret = d.returns or body.type
        if d.returns and not type_accepts(d.returns, body.type):
            self.sink.error("E005", f"'{d.name}' declares -> {d.returns} but its body is {body.type}", d.body.span,
                            f"change the declared type to -> {body.type}, or the body to give {_tname(d.returns)}")
        out = ir.DefIR(qualname=qual, params=tuple(params), returns=ret, body=body, span=d.span)
        self._in_progress.discard(qual)
        self.defs[qual] = out
        self._order.append(qual)
        return out

    def _binding(self, qual: str) -> ir.Binding | None:
        if qual in self.bindings:
            return self.bindings[qual]
        stmt, mod = self._bind_ast[qual]
        if qual in self._in_progress:
            self.sink.error("E009", f"'{stmt.name}' is defined in terms of itself", stmt.span,
                            "a model, merge or let cannot use its own value; refer to the inputs instead")
            return None
        if qual in self._failed:
            return None
        self._in_progress.add(qual)
        n_errors = len(self.sink.errors)
        with self._tune_allowed(isinstance(stmt, ast.Merge)):
            value = self.expr(stmt.value, mod, {})
        rules: list[ir.RuleIR] = []
        if isinstance(stmt, ast.ModelDecl):
            kind = "models" if stmt.plural else "model"
            if not type_accepts(kind, value.type):
                hint = "use `models` for a list" if value.type == "models" else "use `model` for a single model" \
                    if value.type == "model" else 'a model comes from local("dir"), hf("repo"), zoo(...) or a merge'
                if kind == "models" and value.type not in ("models", "model"):
                    hint = 'a list of models, e.g. models experts = [local("a"), local("b")]'
                self.sink.error("E005", f"'{stmt.name}' is declared {kind} but its value is {value.type}", stmt.value.span, hint)
        elif isinstance(stmt, ast.TaskDecl):
            kind = "task"
            if not type_accepts("task", value.type):
                self.sink.error("E005", f"task '{stmt.name}' must be a task, not {value.type}", stmt.value.span,
                                'e.g. task austen = classify("austen", zoo="text")')
        elif isinstance(stmt, ast.Merge):
            kind = "merge"
            if not type_accepts("model", value.type):
                self.sink.error("E005", f"merge '{stmt.name}' must be a model, not {value.type}", stmt.value.span,
                                "a merge combines models into one model")
            pats: dict[str, Span] = {}
            for r in stmt.rules:
                regex, caps = pattern_regex(r.pattern)
                if r.pattern in pats:
                    self.sink.error("E012", f"pattern '{r.pattern}' appears twice; the second never matches", r.pattern_span,
                                    f"first at {pats[r.pattern]}")
                pats[r.pattern] = r.pattern_span
                with self._tune_allowed(True):
                    rv = self.expr(r.value, mod, {c: "int" for c in caps})
                if not type_accepts("model", rv.type):
                    self.sink.error("E005", f"rule value must be a model, not {rv.type}", r.value.span,
                                    'a rule gives the tensors it matches a model expression, e.g. "*.norm.*" => base')
                rules.append(ir.RuleIR(pattern=r.pattern, regex=regex, captures=caps, value=rv, span=r.span,
                                       pattern_span=r.pattern_span))
        else:
            kind = "let"
        typ = "model" if kind == "merge" else value.type
        b = ir.Binding(qualname=qual, kind=kind, type=typ, value=value, rules=tuple(rules), span=stmt.span)
        self._in_progress.discard(qual)
        if any(d.code == "E009" for d in self.sink.errors[n_errors:]):
            self._failed.add(qual)  # report a cycle once, not again from each member
            return None
        if len(self.sink.errors) > n_errors:
            self._had_errors.add(qual)
        self.bindings[qual] = b
        self._order.append(qual)
        return b

    # ------------------------------------------------------------------ expressions
    def _unknown(self, mod: _Module, name: str, span: Span, scope: dict, called: bool = False) -> None:
        import difflib

        # a called name is compared with functions, a value's name with values
        cands = [n for n, sym in mod.names.items() if (sym.kind == "def") == called]
        cands += ([o for o, d in OPS.items() if d.public] + list(BUILTINS)) if called else list(scope)
        close = difflib.get_close_matches(name, cands, n=1)
        if close:
            hint = f"did you mean '{close[0]}'?"
        elif called:
            hint = f"define it with `def {name}(...) = ...`, or `use merging` for the stdlib merge methods"
        else:
            hint = f"declare it first, e.g. `model {name} = local(\"dir\")` or `merge {name} = ...`"
        for std in sorted(STDLIB_FILES):
            if std not in mod.qualified and self._stdlib_defines(std, name):
                hint = f"'{name}' is defined in the stdlib module '{std}': add `use {std}` at the top"
        self.sink.error("E002", f"unknown name '{name}'", span, hint)

    def _stdlib_defines(self, std: str, name: str) -> bool:
        p = stdlib_path(std)
        return bool(p and re.search(rf"^def\s+{re.escape(name)}\b", p.read_text(), re.MULTILINE))

    def _lookup(self, mod: _Module, name: str) -> _Sym | None:
        if "." in name:
            alias, _, rest = name.partition(".")
            return mod.qualified.get(alias, {}).get(rest)
        return mod.names.get(name)

    def _lookup_imported(self, mod: _Module, name: str) -> str | None:
        for alias, names in mod.qualified.items():
            if name in names and names[name].kind == "def":
                return alias
        return None

    def _sym_type(self, sym: _Sym) -> str:
        if sym.kind == "def":
            return "function"
        # NOTE: resolving the binding here (not just reading its declared kind) is what
        # detects definitions that depend on themselves (E009) before lowering loops.
        b = self._binding(sym.qualname)
        if sym.kind in ("model", "models"):
            return sym.kind
        if sym.kind == "merge":
            return "model"
        return b.type if b else "any"

    def expr(self, e: ast.Expr, mod: _Module, scope: dict[str, str]) -> ir.Expr:
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

    def _expr(self, e: ast.Expr, mod: _Module, scope: dict[str, str]) -> ir.Expr:
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
            elif types <= {"model"}:
                t = "models"
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
            return float(x.value) if _num(x.value) and math.isfinite(x.value) else None
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

    def _call(self, e: ast.Call, mod: _Module, scope: dict[str, str]) -> ir.Expr:
        s = e.span
        args = tuple(self.expr(a, mod, scope) for a in e.args)
        kwargs = tuple((k.name, self.expr(k.value, mod, scope), k.span) for k in e.kwargs)
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
            if e.func in _PATH_BUILTINS:  # their strings become file names
                for a in args + tuple(v for _, v, _ in kwargs):
                    if isinstance(a, ir.Ref) and a.scope == "global" and a.name in self.bindings:
                        a = self.bindings[a.name].value  # a `let` holding the string: reported there
                    if isinstance(a, ir.Const) and isinstance(a.value, str) and a.span not in self._paths_seen:
                        self._paths_seen.add(a.span)  # a `let` used twice is reported once
                        check_path_string(self.sink, a.value, a.span)
            if e.func == "tune":
                self._check_tune(e, args, kwargs)
            return ir.CallE(span=s, type=b.returns, kind="builtin", target=e.func, args=args,
                            kwargs=tuple((k, v) for k, v, _ in kwargs))
        self._unknown(mod, e.func, e.func_span, scope, called=True)
        return ir.Const(span=s, type="any", value=None)

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
        if values is not None and values.type != "any":
            if not (isinstance(values, ir.ListE) and values.items
                    and all(isinstance(i, ir.Const) and i.type in ("number", "int") for i in values.items)):
                self.sink.error("E019", "tune() needs a literal list of candidate numbers", values.span,
                                "e.g. tune([0.1, 0.2, 0.3, 0.5, 0.7, 1.0], on=[task1, task2]), or a `let` holding one")
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
                    self.sink.error("E005", f"tune() chooses on tasks, not {_tname(i.type)}", i.span,
                                    'declare one with `task NAME = classify("NAME", zoo="text")`')
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
            if not type_accepts(typ, a.type):
                hint = f"signature: {e.func}({', '.join(names)})"
                if typ in ("models", "tensors") and a.type == "model":
                    hint = f"wrap it in a list: [{_src(a)}]"
                elif typ == "model" and a.type == "models":
                    hint = "this parameter takes one model"
                self.sink.error("E005", f"argument '{n}' of '{e.func}' must be {_tname(typ)}, not {_tname(a.type)}", a.span, hint)
                continue
            if spec is not None and self.folded(a) is not None:
                self.check_value(n, e.func, spec.choices, spec.range, spec.type, self.folded(a), a.span)
            elif isinstance(a, ir.Const) and spec is not None and not (_num(a.value) and not math.isfinite(a.value)):
                self.check_value(n, e.func, spec.choices, spec.range, spec.type, a.value, a.span)
            elif isinstance(a, ir.ListE) and spec is not None and spec.type in ("number", "int", "numbers"):
                for item in a.items:  # each point of a gradient, each weight
                    if self.folded(item) is not None:
                        self.check_value(n, e.func, spec.choices, spec.range, "number", self.folded(item), item.span)
            elif builtin and typ in ("number", "int") and a.type in ("numbers", "list"):
                self.sink.error("E005", f"argument '{n}' of '{e.func}' must be {_tname(typ)}, not {_tname(a.type)}", a.span,
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


def _num(v) -> bool:
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
        return all(check_param_value(sink, name, func, None, rng, "number", v, span) for v in value if _num(v))
    if rng and _num(value):
        lo, hi = rng
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            sink.error("E006", f"{name}={value:g} is out of range for {func}", span, f"{name} must be in [{lo_s}, {hi_s}]")
            return False
    if _num(value) and not math.isfinite(value):
        sink.error("E006", f"{name}={value:g} is not a finite number ({func})", span,
                   "numbers must be finite: NaN and infinity come from overflowing arithmetic such as 1e999 or 1e999 - 1e999")
        return False
    if _num(value) and abs(value) > FLOAT32_MAX:
        sink.error("E006", f"{name}={value:g} is beyond float32 range for {func}", span,
                   f"values that reach tensors must be within ±{FLOAT32_MAX:.4g}")
        return False
    if typ == "int" and isinstance(value, float) and not value.is_integer():
        sink.error("E005", f"{name} of {func} must be an integer, not {value:g}", span, "give a whole number, e.g. 2")
        return False
    return True


def _ir_children(x: ir.Expr) -> tuple:
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


def _eval_depth(x: ir.Expr, known: dict[str, int]) -> int:
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
        stack.extend((c, d + 1) for c in _ir_children(node))
    return best


_PATH_BUILTINS = {"local", "hf", "zoo", "package", "classify"}
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


def _tname(t: str) -> str:
    return {"model": "a model", "models": "a list of models", "number": "a number", "int": "an integer",
            "string": "a string", "bool": "a bool", "numbers": "a list of numbers", "list": "a list",
            "tensor": "a model", "tensors": "a list of models", "none": "none", "function": "a function",
            "slice": "a layer range"}.get(t, t)


def _src(a: ir.Expr) -> str:
    return a.name.split("::")[-1] if isinstance(a, ir.Ref) else "..."


def check_source_partial(text: str, file: str) -> tuple[ir.Program | None, ir.Program | None, DiagnosticSink]:
    """Check one spec: the program (None on errors), on errors the partial program of the
    definitions that checked cleanly (None when the file could not be parsed), and all
    diagnostics."""
    c = Checker()
    prog = c.check_program(file, text)
    return prog, c.partial, c.sink


def check_file(path: str) -> ir.Program:
    """Read and check a spec; raises FuseErrors (errors and warnings) on any error."""
    text = read_source(path)
    prog, partial, sink = check_source_partial(text, path)
    if prog is None:
        err = FuseErrors(sink.items)
        err.partial = partial  # what checked cleanly, for `check` to value-check too
        raise err
    warnings = tuple(d for d in sink.items if d.severity == "warning")
    return prog.model_copy(update={"warnings": warnings}) if warnings else prog
