"""Lower a checked Program against model headers into a Plan.

Evaluation is per tensor: a merge is evaluated once for every tensor name of its
output, in a `TensorCtx` (name, layer index, gradient position). Models evaluate to
`TensorV` (a plan node); numbers to floats (schedules resolve to the layer's value);
`def` calls are inlined by evaluating their bodies. Rule blocks pick the first pattern
that matches the tensor name. Model-wide statistics (TIES trim over the whole task
vector) become reduce nodes that split the plan into phases.

In dry mode (no model files) every merge is evaluated once at a probe tensor, which
checks argument values through `def`s without reading any headers.
"""

from __future__ import annotations

import math
import os

from .. import arch, ir
from ..lang.diagnostics import Diagnostic, FuseErrors, Span
from ..runtime.sources import is_source_call
from .domains import Domain, Domains
from .graph import OutputSpec, Plan
from .values import (
    FLOAT_DTYPES,
    PROBE,
    SAVE_DTYPES,
    SOURCE_ERROR_CODES,
    EvalError,
    MissingTensor,
    TensorCtx,
    TensorV,
    at,
)


class Lowerer(Domains):
    """Lowers every `save` of a checked program into a Plan (outputs, their tensors'
    nodes, model-wide statistics), or in `dry` mode checks argument values at probe
    tensors without model files. Raises FuseErrors with every error of the file."""

    def lower(self) -> Plan:
        """Lower every save; report all errors of the file at once (every absent or
        unreadable model, every unmatched rule of an output that did lower)."""
        lowered = []
        for save in self.prog.saves:
            try:
                self.lower_output(save)
                lowered.append(save)
            except EvalError as e:
                for d in e.diags:
                    self._report(d)
        if not self.dry:
            self.check_output_paths()
        if not self.dry and any(d.code in SOURCE_ERROR_CODES for d in self.sink.errors):
            # lowering stops at the first model it cannot read: name the others too
            reported = {d.span for d in self.sink.errors}
            for d in self.check_sources():
                if d.span not in reported:  # one error per source call (its first reading said it)
                    self._report(d)
        if not self.dry:
            # NOTE: only the rules of outputs that were lowered whole: an output that
            # stopped early (e.g. a missing model) would make its rules look unmatched.
            self.check_rules(lowered)
        if not self.dry and not self.sink.errors:
            self.finish_stats()
        self.sink.raise_if_errors()
        return self.plan

    def dry_check(self, partial: bool = False, merges: set[str] | None = None, first_probe_only: bool = False) -> None:
        """Evaluate every merge at a probe tensor (no model files needed), at several
        positions in the layer stack so that gradients are checked at every layer.
        `partial`: the program lacks the definitions that had errors; merges that use
        one are skipped (their errors are already reported). `merges` limits the check
        to those merges; `first_probe_only` evaluates at one position (for a scalar
        that changed, e.g. a tune() candidate)."""
        probes = [TensorCtx(PROBE, PROBE, 0, 2)] if first_probe_only else self._probes()
        for q, b in self.prog.bindings.items():
            if b.kind != "merge" or self.slices_call(b) is not None or (merges is not None and q not in merges):
                continue
            if partial and not (self._complete(b.value, set()) and all(self._complete(r.value, set()) for r in b.rules)):
                continue
            for ctx in probes:
                n = len(self.sink.errors)
                try:
                    self.eval(b.value, (), ctx)
                    for r in b.rules:
                        self.eval(r.value, tuple((c, 0) for c in r.captures), ctx)
                except EvalError as e:
                    for d in e.diags:
                        self._report(d)
                if len(self.sink.errors) > n:
                    break  # one position's errors are enough: the others repeat them
        self.sink.raise_if_errors()

    def check_sources(self) -> list[Diagnostic]:
        """Locate and read every model source of the program whose arguments are known
        without evaluating a def (all of them, not only the first that fails, so `check`
        lists every absent or broken model)."""
        out: list[Diagnostic] = []
        seen: set[Span] = set()
        for b in self.prog.bindings.values():
            stack = [b.value, *(r.value for r in b.rules)]
            while stack:
                e = stack.pop()
                if is_source_call(e) and e.span not in seen and not _has_local(e):
                    seen.add(e.span)
                    try:
                        self.source(e, self.call_args(e, (), TensorCtx(PROBE, PROBE, 0, 2)))
                    except EvalError as err:
                        out += err.diags
                    continue
                stack.extend(reversed(ir.children(e)))
        return sorted(out, key=lambda d: (d.span.line, d.span.col))

    def _probes(self) -> list[TensorCtx]:
        """Probe positions t = i/m in the layer stack: every breakpoint of a gradient of up
        to 9 values, and of every longer literal list of the program. A gradient (and
        ramp) is piecewise linear, so its extremes lie on breakpoints. Ordered from the
        ends inwards: t=0 (the first layer), t=1 (the last), then 1/2, 1/3, ..."""
        denoms = set(range(1, 9))
        for e in self._all_exprs():
            if isinstance(e, ir.ListE) and 9 < len(e.items) <= 257:
                denoms.add(len(e.items) - 1)
        seen: set[tuple[int, int]] = set()
        out = [TensorCtx(PROBE, PROBE, 0, 2), TensorCtx(PROBE, PROBE, 1, 2)]
        for m in sorted(denoms):
            for i in range(1, m):
                g = math.gcd(i, m)
                if (i // g, m // g) not in seen and m // g > 1:
                    seen.add((i // g, m // g))
                    out.append(TensorCtx(PROBE, PROBE, i // g, m // g + 1))
        return out

    def _all_exprs(self):
        roots: list[ir.Expr] = []
        for b in self.prog.bindings.values():
            roots += [b.value, *(r.value for r in b.rules)]
        for d in self.prog.defs.values():
            roots += [d.body, *(p.default for p in d.params if p.default is not None)]
        for root in roots:
            yield from ir.walk_expr(root)

    def _complete(self, e: ir.Expr, seen: set[str]) -> bool:
        """Does `e` use only definitions present in the program (none that had errors)?"""
        if isinstance(e, ir.Ref) and e.scope == "global":
            if e.name in seen:
                return True
            seen.add(e.name)
            b = self.prog.bindings.get(e.name)
            return b is not None and self._complete(b.value, seen) and all(self._complete(r.value, seen) for r in b.rules)
        if isinstance(e, ir.CallE) and e.kind == "def" and e.target not in seen:
            seen.add(e.target)
            d = self.prog.defs.get(e.target)
            if d is None or not self._complete(d.body, seen) or not all(
                    self._complete(p.default, seen) for p in d.params if p.default is not None):
                return False
        return all(self._complete(c, seen) for c in ir.children(e))

    def lower_output(self, save: ir.SaveIR) -> None:
        b = self.prog.bindings[save.name]
        dom = self.domain(b)
        ref = self.plan.sources[dom.reference]
        out = OutputSpec(save.display, save.path, save.dtype, {}, {}, {}, dom.reference, dom.config_overrides,
                         self._loc(save.span), at=at(save.path_span), note=dom.note, description=dom.description,
                         tokenizer=dom.tokenizer)
        self._check_output_path(save)
        first_missing: MissingTensor | None = None
        for name in dom.names:
            if name in dom.source_of:
                _si, src_name, layer, n = dom.source_of[name]
                ctx = TensorCtx(src_name, dom.group_of.get(name, name), layer, n, name)
            else:
                ctx = TensorCtx(name, name, arch.layer_of(name), dom.num_layers)
            try:
                v = self.eval_binding(b, ctx)
            except MissingTensor as m:
                first_missing = first_missing or m
                continue
            if not isinstance(v, TensorV):
                raise EvalError("E005", f"'{save.display}' does not evaluate to a model", b.span,
                                "only a merge of models can be saved; a number or list cannot")
            src_dtype = v.dtype or ref.tensors.get(ctx.tensor, ("F32",))[0]
            dtype = SAVE_DTYPES[save.dtype] if save.dtype else src_dtype
            if dtype not in FLOAT_DTYPES:
                dtype = src_dtype
            node = self.plan.add("cast", (v.node,), {"dtype": dtype}, group=ctx.group, loc=out.loc, shape=v.shape)
            out.tensors[name] = node
            out.dtypes[name] = dtype
            out.shapes[name] = v.shape or ()
        if first_missing:
            self._report_missing(first_missing, dom)
        elif not dom.source_of:
            # every output tensor was computed (rules may read a tensor only some inputs
            # have from those); but a tensor the reference lacks would be left out
            ref_names = set(self.headers[dom.reference].tensors)
            for key in sorted(k for k in self._sources_read(out) if k in self.headers):  # models, not stage results
                if set(self.headers[key].tensors) - ref_names:
                    self._report_missing(MissingTensor(key, "", self.sources_used.get(key, save.span)), dom)
        if not ref.config:  # the output's config.json is the reference's: take another input's, or refuse
            read = self._sources_read(out)
            out.reference = next((k for k in self.plan.sources if k in read and self.plan.sources[k].config), out.reference)
            if not self.plan.sources[out.reference].config:
                self._report(Diagnostic("E011", f"model '{dom.reference}' has no config.json (nor does any other input of "
                                        f"'{save.display}'): transformers needs one to load the output",
                                        self.sources_used.get(dom.reference, save.span),
                                        f"copy the base model's config.json into {ref.path}"))
        # NOTE: keyed by the merge's name (a second save of one merge gets `name#2`), so
        # saving one merge twice writes both outputs
        key, k = save.display, 1
        while key in self.plan.outputs:
            k += 1
            key = f"{save.display}#{k}"
        self.plan.outputs[key] = out

    def _sources_read(self, out: OutputSpec) -> set[str]:
        keys, stack, seen = set(), list(out.tensors.values()), set()
        while stack:
            nid = stack.pop()
            if nid in seen or nid not in self.plan.nodes:  # reduce nodes are added later
                continue
            seen.add(nid)
            n = self.plan.nodes[nid]
            if n.op == "load":
                keys.add(n.param("source"))
            stack.extend(n.inputs)
        return keys

    def _check_output_path(self, save: ir.SaveIR) -> None:
        span = save.path_span
        shown = os.path.relpath(save.path)
        parent = os.path.dirname(save.path.rstrip("/")) or "."
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe) or "."
        if os.path.exists(save.path) and not os.path.isdir(save.path):
            raise EvalError("E016", f"output '{shown}' exists and is not a directory", span, "choose another path")
        if not os.path.isdir(probe):
            raise EvalError("E016", f"cannot write to '{shown}': '{os.path.relpath(probe)}' is a file, not a directory",
                            span, "choose an output path whose parents are directories")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise EvalError("E016", f"cannot write to '{shown}': '{os.path.relpath(probe)}' is not writable", span,
                            "choose a directory you can write to")

    def check_output_paths(self) -> None:
        """Report (E016, at the save path) every save that breaks a save-path rule of
        `fusionlang.runtime.outputs`: an output that is, holds or is inside an input model, holds a
        spec file, collides with another save, is a dangling symlink, or is an existing
        directory fusionlang did not write. Needs the sources read (after lowering)."""
        from ..runtime.outputs import check_paths

        saves = list(self.prog.saves)
        inputs = [(k, s.path, sorted({f for _, _, f in s.tensors.values() if f})) for k, s in self.plan.sources.items()
                  if not s.stage]
        specs = sorted({self.prog.file} | {b.span.file for b in self.prog.bindings.values()}
                       | {d.span.file for d in self.prog.defs.values()})
        specs = [f for f in specs if f and os.path.isfile(f)]
        self.plan.spec_files = specs  # a saved plan checks them again when it runs
        for p in check_paths([(s.path, str(s.path_span)) for s in saves], inputs, specs):
            self._report(Diagnostic("E016", p.message, saves[p.index].path_span, p.hint))

    def _report_missing(self, m: MissingTensor, dom: Domain) -> None:
        ref = set(self.headers[dom.reference].tensors)
        other = set(self.headers[m.source].tensors)
        only_ref, only_other = sorted(ref - other), sorted(other - ref)

        def show(xs):
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

        parts = []
        if only_ref:
            parts.append(f"missing from '{m.source}': {show(only_ref)}")
        if only_other:
            parts.append(f"only in '{m.source}': {show(only_other)}")
        self._report(Diagnostic("E013", f"models '{dom.reference}' and '{m.source}' have different tensor names",
                                self.sources_used.get(m.source, m.span),
                                "; ".join(parts) + ". Inputs must share an architecture; " + (
                                    f"the output has the tensors of '{dom.reference}' (the first model read): put a model "
                                    "with every tensor first" if only_other and not m.tensor else
                                    "for a tensor only some inputs have, add a rule that reads it from those, e.g. "
                                    f"\"{m.tensor or only_ref[0]}\" => {dom.reference}")))

    def check_rules(self, saves: list) -> None:
        """E012 for each rule pattern that matched no tensor of the `saves` (lowered whole) that use it."""
        for b in self.prog.bindings.values():
            for i, r in enumerate(b.rules):
                used_by_output = any(self.prog.bindings[s.name] is b or self._depends(s.name, b.qualname) for s in saves)
                if used_by_output and (b.qualname, i) not in self.rules_used:
                    self._report(Diagnostic("E012", f"pattern '{r.pattern}' matches no tensor", r.pattern_span,
                                            self._pattern_hint(r.pattern)))

    def _depends(self, root: str, target: str) -> bool:
        stack, seen = [root], set()
        while stack:
            q = stack.pop()
            if q == target:
                return True
            if q in seen or q not in self.prog.bindings:
                continue
            seen.add(q)
            b = self.prog.bindings[q]
            stack.extend(_refs(b.value) | {x for r in b.rules for x in _refs(r.value)})
        return False

    def _pattern_hint(self, pattern: str) -> str:
        names = [n for h in self.headers.values() for n in h.tensors]
        import difflib

        close = difflib.get_close_matches(pattern.replace("{i}", "0").replace("*", ""), names, n=1, cutoff=0.3)
        return f"tensor names look like '{close[0]}'" if close else "patterns are globs over tensor names; `*` matches any text"

def _has_local(e: ir.Expr) -> bool:
    return any(isinstance(n, ir.Ref) and n.scope == "local" for n in ir.walk_expr(e))


def _refs(e) -> set[str]:
    out: set[str] = set()
    if isinstance(e, ir.Ref) and e.scope == "global":
        out.add(e.name)
    for f in ("items", "args"):
        for c in getattr(e, f, ()) or ():
            out |= _refs(c)
    for f in ("body", "iterable", "left", "right", "operand", "test", "then", "other", "value", "index"):
        c = getattr(e, f, None)
        if c is not None:
            out |= _refs(c)
    for _, v in getattr(e, "kwargs", ()) or ():
        out |= _refs(v)
    return out


def lower(prog: ir.Program) -> Plan:
    """Lower a checked program to an (unoptimized) plan; raises FuseErrors."""
    return Lowerer(prog).lower()


def dry_check(prog: ir.Program) -> None:
    Lowerer(prog, dry=True).dry_check()


__all__ = ["FuseErrors", "Lowerer", "dry_check", "lower"]
