"""Modules and names: the spec, the stdlib and `use`d files, their symbols, and name
resolution across them. No torch."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .. import ir
from ..ops import OPS
from . import ast
from .diagnostics import DiagnosticSink, FuseErrors, Span
from .parser import parse, read_source
from .signatures import BUILTINS
from .values import check_path_string

ENTRY = "spec"
STDLIB_FILES = {"merging"}


@dataclass
class Sym:
    kind: str  # model | models | let | merge | def
    qualname: str
    span: Span


@dataclass
class Module:
    key: str
    file: str
    tree: ast.Module
    names: dict[str, Sym] = field(default_factory=dict)
    qualified: dict[str, dict[str, Sym]] = field(default_factory=dict)  # alias -> names


def stdlib_path(name: str) -> Path | None:
    res = resources.files("fusionlang.stdlib").joinpath(f"{name}.fuse")
    return Path(str(res)) if res.is_file() else None


def stdlib_modules() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fusionlang.stdlib").iterdir() if p.name.endswith(".fuse"))


class ModuleChecker:
    """Modules and names: loads the spec and the modules it `use`s (stdlib or files),
    declares their definitions and resolves names across them (with did-you-mean)."""

    def __init__(self) -> None:
        self.sink = DiagnosticSink()
        self.modules: dict[str, Module] = {}
        self.bindings: dict[str, ir.Binding] = {}
        self.defs: dict[str, ir.DefIR] = {}
        self._def_ast: dict[str, tuple[ast.Def, Module]] = {}
        self._bind_ast: dict[str, tuple[ast.Stmt, Module]] = {}
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

    def load(self, key: str, file: str, text: str, use_span: Span | None = None) -> Module | None:
        if key in self.modules:
            return self.modules[key]
        try:
            tree = parse(text, file)
        except FuseErrors as e:
            self.sink.items.extend(e.diagnostics)
            return None
        mod = Module(key, file, tree)
        self.modules[key] = mod
        self._loading.append(key)
        for stmt in tree.stmts:
            if isinstance(stmt, ast.Use):
                self._use(mod, stmt)
        for stmt in tree.stmts:
            self._declare(mod, stmt)
        self._loading.pop()
        return mod

    def _use(self, mod: Module, stmt: ast.Use) -> None:
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

    def _declare(self, mod: Module, stmt: ast.Stmt) -> None:
        if isinstance(stmt, (ast.Use, ast.Save, ast.Eval)):
            return
        name = stmt.name
        kind = {ast.Def: "def", ast.Let: "let", ast.Merge: "merge", ast.TaskDecl: "task", ast.DataDecl: "data", ast.EnsembleDecl: "ensemble"}.get(type(stmt))
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
        mod.names[name] = Sym(kind, qual, stmt.span)
        if kind == "def":
            self._def_ast[qual] = (stmt, mod)
        else:
            self._bind_ast[qual] = (stmt, mod)

    def _unknown(self, mod: Module, name: str, span: Span, scope: dict, called: bool = False) -> None:
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

    def _lookup(self, mod: Module, name: str) -> Sym | None:
        if "." in name:
            alias, _, rest = name.partition(".")
            return mod.qualified.get(alias, {}).get(rest)
        return mod.names.get(name)

    def _lookup_imported(self, mod: Module, name: str) -> str | None:
        for alias, names in mod.qualified.items():
            if name in names and names[name].kind == "def":
                return alias
        return None

    def _sym_type(self, sym: Sym) -> str:
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
