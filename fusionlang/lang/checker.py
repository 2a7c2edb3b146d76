"""Resolve and check: AST modules -> typed IR `Program`.

Resolves names across `use`d modules (stdlib or spec files), infers and checks types,
validates calls against `def` signatures and the op registry (argument names, counts,
types, `Literal` choices, ranges of constants). Reports every error of a file at once.
Needs no model files and never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from .. import ir
from . import ast
from .diagnostics import DiagnosticSink, FuseErrors, Span
from .expressions import ExprChecker, type_name
from .modules import Module
from .parser import read_source
from .signatures import pattern_regex, type_accepts
from .values import MAX_EVAL_DEPTH, check_path_string, eval_depth, spec_path


class Checker(ExprChecker):
    """A whole program: bindings, defs, saves and evals, in dependency order; every error
    of the file at once (`sink`), and on errors the program without what had them."""

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
        ensemble_saves = tuple(s for s in saves if self.bindings.get(s.name) is not None
                               and self.bindings[s.name].kind == "ensemble")
        saves = [s for s in saves if s not in ensemble_saves]
        return ir.Program(file=file, text=text, module=mod.key, bindings=self.bindings, defs=self.defs, saves=tuple(saves),
                          ensemble_saves=ensemble_saves,
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
            n = max(eval_depth(x, depth) for x in exprs)
            depth[qual] = n
            if n > MAX_EVAL_DEPTH:
                self._had_errors.add(qual)  # left out of the partial program the lowering checks
            if n > MAX_EVAL_DEPTH and not self._too_deep:
                self._too_deep = True
                name = qual.split("::")[-1]
                self.sink.error("E006", f"'{name}' nests too deep: evaluating it nests {n} levels, through the "
                                f"definitions it uses (limit {MAX_EVAL_DEPTH})", span,
                                "shorten the chain of definitions it uses, or split its expression")

    def _save(self, mod: Module, stmt: ast.Save, seen: dict[str, Span]) -> ir.SaveIR | None:
        sym = mod.names.get(stmt.name)
        if sym is None:
            self._unknown(mod, stmt.name, stmt.name_span, {})
            return None
        if sym.kind not in ("merge", "model", "ensemble"):
            self.sink.error("E005", f"cannot save '{stmt.name}': it is a {sym.kind}, not a model", stmt.name_span,
                            "save takes a merge, a model or an ensemble")
            return None
        if sym.kind == "ensemble" and stmt.dtype is not None:
            self.sink.error("E006", "an ensemble is saved as a manifest of its members; `as DTYPE` does not apply",
                            stmt.dtype_span or stmt.span, "save the members' merges with a dtype instead")
            return None
        if stmt.dtype is not None and stmt.dtype not in ("bf16", "fp16", "fp32"):
            self.sink.error("E006", f"unknown dtype '{stmt.dtype}'", stmt.dtype_span or stmt.span, "use bf16, fp16 or fp32")
            return None
        if not stmt.path.strip():
            self.sink.error("E016", "empty output path", stmt.path_span, "give a directory to write the model to")
            return None
        if not check_path_string(self.sink, stmt.path, stmt.path_span):
            return None
        path = spec_path(mod.file, stmt.path)
        if path in seen:
            self.sink.error("E016", f"two saves write to '{stmt.path}'", stmt.path_span, f"the other save is at {seen[path]}")
            return None
        seen[path] = stmt.span
        return ir.SaveIR(name=sym.qualname, display=stmt.name, path=path, dtype=stmt.dtype, span=stmt.span,
                         path_span=stmt.path_span)

    def _eval(self, mod: Module, stmt: ast.Eval) -> ir.EvalIR | None:
        models, tasks, ok = [], [], True
        for names, want, out in ((stmt.models, ("model", "merge", "models", "ensemble"), models),
                                 (stmt.tasks, ("task",), tasks)):
            for name, span in names:
                sym = mod.names.get(name)
                if sym is None:
                    self._unknown(mod, name, span, {})
                    ok = False
                elif sym.kind not in want:
                    what = "a model, merge or ensemble" if "model" in want else "a task"
                    self.sink.error("E005", f"'{name}' is a {sym.kind}, not {what}", span,
                                    "eval MODELS on TASKS: models first, then tasks declared with `task NAME = classify(...)`")
                    ok = False
                else:
                    out.append(sym.qualname)
        report = None
        if stmt.report is not None and not check_path_string(self.sink, stmt.report, stmt.report_span or stmt.span):
            ok = False
        elif stmt.report is not None:
            report = spec_path(mod.file, stmt.report)
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

    def _def_body(self, qual: str, d: ast.Def, mod: Module) -> ir.DefIR:
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
                            f"change the declared type to -> {body.type}, or the body to give {type_name(d.returns)}")
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
        elif isinstance(stmt, ast.DataDecl):
            kind = "data"
            if not type_accepts("data", value.type):
                self.sink.error("E005", f"data '{stmt.name}' must be a data value, not {value.type}", stmt.value.span,
                                'e.g. data calib = dataset("calib.jsonl", text="text", n=256) or '
                                'zoo_data("tops", zoo="vision", split="train", n=256)')
        elif isinstance(stmt, ast.EnsembleDecl):
            kind = "ensemble"
            if not type_accepts("ensemble", value.type):
                self.sink.error("E005", f"ensemble '{stmt.name}' must be an ensemble, not {value.type}", stmt.value.span,
                                "e.g. ensemble ens = ensemble(experts, weights=[0.6, 0.4])")
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
