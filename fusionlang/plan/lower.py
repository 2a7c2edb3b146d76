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

import hashlib
import math
import os
import re
from dataclasses import dataclass, field

from . import arch, ir
from .checker import check_param_value
from .diagnostics import Diagnostic, DiagnosticSink, FuseErrors, Span
from .ops import OPS
from .ops.arith import weights_sum_is_zero
from .ops.sparsify import tensor_seed
from .plan.graph import OutputSpec, Plan, SourceSpec, add_with_id
from .runtime.sources import (
    SOURCE_BUILTINS,
    ModelHeader,
    SourceError,
    is_source_call,
    read_model_dir,
    source_dir,
)

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SAVE_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def param_names(prog: ir.Program, call: ir.CallE) -> list[str]:
    """The parameter names of a call's target (a def, an op or a builtin), in order."""
    if call.kind == "def":
        return [p.name for p in prog.defs[call.target].params]
    if call.kind == "op":
        return [p.name for p in OPS[call.target].params]
    from .checker import BUILTINS

    return [p[0] for p in BUILTINS[call.target].params]


class EvalError(Exception):
    def __init__(self, code: str, message: str, span: Span, hint: str = "", more: tuple[Diagnostic, ...] = ()):
        super().__init__(message)
        self.diag = Diagnostic(code, message, span, hint)
        self.diags = [self.diag, *more]  # every error found at once (e.g. all bad arguments of a call)


@dataclass(frozen=True)
class _Origin:
    """Where a `def` parameter's value came from: the argument the user wrote."""

    span: Span
    func: str  # the function the user called
    param: str  # its parameter the argument was passed to


def _origin_key(name: str) -> str:
    return "@" + name  # env entries for origins; '@' cannot start a name


class MissingTensor(Exception):
    def __init__(self, source: str, tensor: str, span: Span):
        super().__init__(tensor)
        self.source, self.tensor, self.span = source, tensor, span


@dataclass(frozen=True)
class TensorV:
    node: str
    shape: tuple[int, ...] | None
    dtype: str | None


@dataclass(frozen=True)
class SliceV:
    expr: ir.Expr
    env: tuple
    start: int
    end: int
    span: Span


@dataclass
class TensorCtx:
    tensor: str  # the tensor name being read from inputs
    group: str  # the output tensor this computation belongs to
    layer: int | None
    num_layers: int

    @property
    def t(self) -> float:
        return arch.gradient_t(self.layer, self.num_layers)


@dataclass
class _Domain:
    names: list[str]  # output tensor names, in reference order
    reference: str  # source key
    num_layers: int
    source_of: dict[str, tuple[int, str, int | None, int]] = field(default_factory=dict)  # slices: out -> (slice#, src name, src layer, src layers)
    config_overrides: dict = field(default_factory=dict)


PROBE = "model.layers.0.probe.weight"
# Errors of reading a model: absent directory or cache entry, unreadable or corrupt files.
SOURCE_ERROR_CODES = {"E010", "E011", "E017", "E018"}


class Lowerer:
    def __init__(self, prog: ir.Program, dry: bool = False):
        self.prog = prog
        self.dry = dry
        self.sink = DiagnosticSink()
        self.plan = Plan()
        self.plan.spec_text, self.plan.spec_file = prog.text, prog.file
        self.headers: dict[str, ModelHeader] = {}
        self.keys: dict[str, str] = {}  # abs path -> source key
        self.names = self._source_names()
        self.site: Span | None = None
        self.rules_used: set[tuple[str, int]] = set()
        self.sources_used: dict[str, Span] = {}
        self.stats: dict[str, dict] = {}
        self._sig: dict[str, str] = {}
        self._warned: set[tuple] = set()

    # ------------------------------------------------------------------ sources
    def _source_names(self) -> dict[Span, str]:
        names: dict[Span, str] = {}
        for b in self.prog.bindings.values():
            short = b.qualname.split("::")[-1]
            if is_source_call(b.value):
                names[b.value.span] = short
            if isinstance(b.value, ir.ListE):
                for i, item in enumerate(b.value.items):
                    if is_source_call(item):
                        names[item.span] = f"{short}[{i}]"
        return names

    def source(self, call: ir.CallE, args: dict) -> str:
        """Resolve a source call (local, hf, zoo, package) to a source key, reading its headers once."""
        if self.dry:
            return self.names.get(call.span, "model")
        try:
            path = source_dir(call.target, args, call.span.file)
            if path in self.keys:
                return self.keys[path]
            header = read_model_dir(path)
        except SourceError as e:
            raise EvalError(e.code, e.message, call.span, e.hint) from None
        key = self.names.get(call.span) or os.path.basename(path.rstrip("/")) or "model"
        while key in self.plan.sources:
            key += "'"
        self.keys[path] = key
        self.headers[key] = header
        self.plan.sources[key] = SourceSpec(key, header.path, {n: (t.dtype, t.shape, t.file) for n, t in header.tensors.items()},
                                            header.config, at=_at(call.span))
        self.sources_used[key] = call.span
        return key

    def load(self, key: str, ctx: TensorCtx, span: Span) -> TensorV:
        if self.dry:
            return TensorV(self.plan.add("load", (), {"source": key, "tensor": ctx.tensor}, group=ctx.group), None, None)
        src = self.plan.sources[key]
        if ctx.tensor not in src.tensors:
            raise MissingTensor(key, ctx.tensor, span)
        dtype, shape, _ = src.tensors[ctx.tensor]
        nid = self.plan.add("load", (), {"source": key, "tensor": ctx.tensor}, group=ctx.group, loc=self._loc(span), shape=shape)
        return TensorV(nid, shape, dtype)

    # ------------------------------------------------------------------ domains
    def first_source(self, e: ir.Expr, seen: set[str] | None = None) -> ir.CallE | None:
        """The first model source an expression reads: its output has that model's tensors."""
        seen = seen if seen is not None else set()
        if isinstance(e, ir.CallE):
            if is_source_call(e):
                return e
            if e.kind == "builtin" and e.target == "slices":
                return None
            for a in list(e.args) + [v for _, v in e.kwargs]:
                r = self.first_source(a, seen)
                if r:
                    return r
            if e.kind == "def":
                return self.first_source(self.prog.defs[e.target].body, seen)
            return None
        if isinstance(e, ir.Ref) and e.scope == "global" and e.name not in seen:
            seen.add(e.name)
            b = self.prog.bindings.get(e.name)
            if b is None:
                return None
            r = self.first_source(b.value, seen)
            for rule in b.rules:
                r = r or self.first_source(rule.value, seen)
            return r
        children: list[ir.Expr] = []
        if isinstance(e, ir.ListE):
            children = list(e.items)
        elif isinstance(e, ir.Comp):
            children = [e.iterable, e.body]
        elif isinstance(e, ir.Bin):
            children = [e.left, e.right]
        elif isinstance(e, ir.Neg):
            children = [e.operand]
        elif isinstance(e, ir.CondE):
            children = [e.then, e.other]
        elif isinstance(e, ir.IndexE):
            children = [e.value]
        for c in children:
            r = self.first_source(c, seen)
            if r:
                return r
        return None

    def slices_call(self, b: ir.Binding) -> ir.CallE | None:
        v = b.value
        while isinstance(v, ir.Ref) and v.scope == "global" and v.name in self.prog.bindings:
            b = self.prog.bindings[v.name]
            v = b.value
        return v if isinstance(v, ir.CallE) and v.kind == "builtin" and v.target == "slices" else None

    def domain(self, b: ir.Binding) -> _Domain:
        sl = self.slices_call(b)
        if sl is not None:
            return self.slices_domain(sl)
        call = self.first_source(b.value)
        if call is None:
            raise EvalError("E013", f"'{b.qualname.split('::')[-1]}' reads no model", b.span,
                            "a merge needs at least one input model")
        args = self.call_args(call, (), TensorCtx(PROBE, PROBE, 0, 2))
        key = self.source(call, args)
        h = self.headers[key]
        names = list(h.tensors)
        return _Domain(names, key, arch.count_layers(h.config, names))

    def slices_domain(self, call: ir.CallE) -> _Domain:
        """The output tensors of a `slices([...])` merge (MergeKit passthrough): the first
        slice's embeddings, each slice's layers renumbered in order, the last slice's
        final norm and head. Every tensor must have the reference (first) model's shape,
        and the per-layer config lists follow the source layers (`arch.slice_config_overrides`)."""
        parts = self.eval(call.args[0], (), TensorCtx(PROBE, PROBE, 0, 2))
        if not isinstance(parts, list) or not parts or not all(isinstance(p, SliceV) for p in parts):
            raise EvalError("E005", "slices() takes a non-empty list of layers(model, start, end)", call.span,
                            "write slices([layers(a, 0, 16), layers(b, 8, 24)])")
        names: list[str] = []
        source_of: dict[str, tuple] = {}
        ref_key = None
        out_layer = 0
        per_layer_rest: list[str] = []
        prefix = None
        layer_srcs: list[tuple[dict, int, int]] = []  # output layer -> (source config, source layer, its layer count)
        for si, p in enumerate(parts):
            scall = self.first_source(p.expr)
            if scall is None:
                raise EvalError("E013", "layers() needs a model", p.span, "write layers(model, start, end)")
            key = self.source(scall, self.call_args(scall, (), TensorCtx(PROBE, PROBE, 0, 2)))
            h = self.headers[key]
            nested = arch.nested_layer_config(h.config)
            if nested and not any(isinstance(h.config.get(k), int) for k in arch.LAYER_COUNT_KEYS):
                raise EvalError("E014", f"'{key}' keeps its layer count in the nested config '{nested}' "
                                "(a multimodal checkpoint); slices() of nested configs is not supported", p.span,
                                "slice the language model saved on its own, or merge it with a per-tensor method")
            prefixes = sorted({s[0] for s in (arch.split_layer(t) for t in h.tensors) if s})
            if len(prefixes) > 1:
                raise EvalError("E014", f"'{key}' has several layer stacks ({', '.join(prefixes)}); slices() needs one",
                                p.span, "slice a model with a single stack of layers")
            n = arch.count_layers(h.config, h.tensors)
            if not (0 <= p.start < p.end <= n):
                raise EvalError("E006", f"layer range [{p.start}, {p.end}) is outside the model's {n} layers", p.span,
                                f"valid ranges lie within [0, {n}); the end is exclusive")
            if si == 0:
                ref_key, ref_start = key, p.start
                for t in h.tensors:
                    if arch.split_layer(t) is None and arch.is_pre_layer(t):
                        names.append(t)
                        source_of[t] = (0, t, None, n)
            ref = self.headers[ref_key]
            for layer in range(p.start, p.end):
                rests = sorted((s[0], s[2]) for s in (arch.split_layer(t) for t in h.tensors) if s and s[1] == layer)
                if prefix is None and rests:
                    prefix = rests[0][0]
                    per_layer_rest = [r for _, r in rests]
                elif [r for _, r in rests] != per_layer_rest:
                    raise EvalError("E013", f"layer {layer} of '{key}' has different tensors than the first slice's layers",
                                    p.span, "slices must come from models of the same architecture")
                for pre, rest in rests:
                    src = f"{pre}.{layer}.{rest}"
                    self._slice_shape(ref, ref_key, f"{prefix}.{ref_start}.{rest}", key, h.tensors[src].shape, src,
                                      p.span)
                    out = f"{pre}.{out_layer}.{rest}"
                    names.append(out)
                    source_of[out] = (si, src, layer, n)
                layer_srcs.append((h.config, layer, n))
                out_layer += 1
            if si == len(parts) - 1:
                post = [t for t in h.tensors if arch.split_layer(t) is None and not arch.is_pre_layer(t)]
                for t in post:
                    self._slice_shape(ref, ref_key, t, key, h.tensors[t].shape, t, p.span)
        for t in post:
            names.append(t)
            source_of[t] = (len(parts) - 1, t, None, n)
        try:
            overrides = arch.slice_config_overrides(self.headers[ref_key].config, layer_srcs)
        except ValueError as err:
            raise EvalError("E014", str(err), call.span,
                            "slice models whose configs agree, or save the model and fix config.json by hand") from None
        return _Domain(names, ref_key, out_layer, source_of, overrides)

    def _slice_shape(self, ref, ref_key: str, ref_name: str, key: str, shape: tuple, name: str, span: Span) -> None:
        """E014 unless tensor `name` of slice model `key` has the shape of the first
        model's `ref_name`: the output's config comes from the first model, so a slice
        of another vocabulary or width would write a model transformers cannot load."""
        info = ref.tensors.get(ref_name)
        if info is None or tuple(info.shape) == tuple(shape):
            return
        raise EvalError("E014", f"slices() mixes shapes: '{name}' of '{key}' is {list(shape)} but '{ref_name}' of "
                        f"'{ref_key}' (the first slice, whose config the output takes) is {list(info.shape)}", span,
                        "slices must come from models of the same architecture and size (hidden size, vocabulary)")

    # ------------------------------------------------------------------ outputs
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
            for d in self.check_sources():
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
                         self._loc(save.span), at=_at(save.path_span))
        self._check_output_path(save)
        first_missing: MissingTensor | None = None
        for name in dom.names:
            if name in dom.source_of:
                _si, src_name, layer, n = dom.source_of[name]
                ctx = TensorCtx(src_name, name, layer, n)
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
            node = self.plan.add("cast", (v.node,), {"dtype": dtype}, group=name, loc=out.loc, shape=v.shape)
            out.tensors[name] = node
            out.dtypes[name] = dtype
            out.shapes[name] = v.shape or ()
        if first_missing:
            self._report_missing(first_missing, dom)
        elif not dom.source_of:
            # every output tensor was computed (rules may read a tensor only some inputs
            # have from those); but a tensor the reference lacks would be left out
            ref_names = set(self.headers[dom.reference].tensors)
            for key in sorted(self._sources_read(out)):
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
        from .runtime.outputs import check_paths

        saves = list(self.prog.saves)
        inputs = [(k, s.path, sorted({f for _, _, f in s.tensors.values() if f})) for k, s in self.plan.sources.items()]
        specs = sorted({self.prog.file} | {b.span.file for b in self.prog.bindings.values()}
                       | {d.span.file for d in self.prog.defs.values()})
        specs = [f for f in specs if f and os.path.isfile(f)]
        for p in check_paths([(s.path, str(s.path_span)) for s in saves], inputs, specs):
            self._report(Diagnostic("E016", p.message, saves[p.index].path_span, p.hint))

    def _report_missing(self, m: MissingTensor, dom: _Domain) -> None:
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

    def _report(self, d: Diagnostic) -> None:
        key = (d.code, d.message, d.span)
        if key not in self._warned:
            self._warned.add(key)
            self.sink.items.append(d)

    # ------------------------------------------------------------------ evaluation
    def eval_binding(self, b: ir.Binding, ctx: TensorCtx):
        for i, r in enumerate(b.rules):
            m = re.match(r.regex, ctx.tensor)
            if m:
                self.rules_used.add((b.qualname, i))
                env = tuple((c, int(m.group(c))) for c in r.captures)
                return self.eval(r.value, env, ctx)
        sl = self.slices_call(b)
        if sl is not None and not self.dry:
            return self.eval_slices(sl, ctx)
        return self.eval(b.value, (), ctx)

    def eval_slices(self, call: ir.CallE, ctx: TensorCtx):
        parts = self.eval(call.args[0], (), ctx)
        dom = self._slices_cache = getattr(self, "_slices_cache", None) or {}
        key = id(call)
        if key not in dom:
            dom[key] = self.slices_domain(call)
        si, src, layer, n = dom[key].source_of.get(ctx.group, (0, ctx.tensor, None, 0))
        p = parts[si]
        return self.eval(p.expr, p.env, TensorCtx(src, ctx.group, layer, n))

    def _loc(self, span: Span | None) -> str:
        s = self.site or span
        return f"{os.path.basename(s.file)}:{s.line}" if s else ""

    def eval(self, e: ir.Expr, env: tuple, ctx: TensorCtx):
        prev = self.site
        if e.span.file == self.prog.file:
            self.site = e.span
        try:
            return self._eval(e, env, ctx)
        finally:
            self.site = prev

    def _lookup(self, env: tuple, name: str):
        for k, v in reversed(env):
            if k == name:
                return v
        raise KeyError(name)

    def _eval(self, e: ir.Expr, env: tuple, ctx: TensorCtx):
        if isinstance(e, ir.Const):
            return e.value
        if isinstance(e, ir.Ref):
            if e.scope == "local":
                return self._lookup(env, e.name)
            b = self.prog.bindings[e.name]
            if b.kind == "merge":
                return self.eval_binding(b, ctx)
            return self.eval(b.value, (), ctx)
        if isinstance(e, ir.ListE):
            return [self.eval(i, env, ctx) for i in e.items]
        if isinstance(e, ir.Comp):
            it = self.eval(e.iterable, env, ctx)
            if not isinstance(it, list):
                raise EvalError("E005", "can only iterate over a list", e.iterable.span,
                                "write [f(m) for m in LIST] with a list of models or numbers")
            return [self.eval(e.body, env + ((e.var, x),), ctx) for x in it]
        if isinstance(e, ir.Neg):
            x = self.eval(e.operand, env, ctx)
            return self.scale(x, -1.0, ctx, e.span) if isinstance(x, TensorV) else -x
        if isinstance(e, ir.CondE):
            test = self.eval(e.test, env, ctx)
            return self.eval(e.then if test else e.other, env, ctx)
        if isinstance(e, ir.Bin):
            return self.binop(e, self.eval(e.left, env, ctx), self.eval(e.right, env, ctx), ctx)
        if isinstance(e, ir.IndexE):
            v, i = self.eval(e.value, env, ctx), self.eval(e.index, env, ctx)
            if not isinstance(v, list) or not isinstance(i, (int, float)) or float(i) != int(i):
                raise EvalError("E005", "only lists can be indexed, with an integer", e.span,
                                "index a `models` list with a whole number, e.g. experts[0]")
            if not -len(v) <= int(i) < len(v):
                raise EvalError("E006", f"index {int(i)} is out of range for a list of {len(v)}", e.index.span,
                                f"valid indices are 0..{len(v) - 1}")
            return v[int(i)]
        if isinstance(e, ir.CallE):
            return self.call(e, env, ctx)
        raise AssertionError(type(e))

    def scale(self, x: TensorV, k: float, ctx: TensorCtx, span: Span) -> TensorV:
        return TensorV(self.plan.add("scale", (x.node,), {"k": float(k)}, group=ctx.group, loc=self._loc(span), shape=x.shape),
                       x.shape, x.dtype)

    def _same_shape(self, xs: list[TensorV], span: Span, ctx: TensorCtx, what: str) -> None:
        shapes = {x.shape for x in xs if x.shape is not None}
        if len(shapes) > 1:
            raise EvalError("E014", f"shape mismatch in {what} for tensor '{ctx.tensor}': "
                            + " vs ".join(str(list(s)) for s in sorted(shapes)), span,
                            "models must share an architecture; use a rule to treat this tensor separately (e.g. => base)")
        floats = {x.dtype in FLOAT_DTYPES for x in xs if x.dtype}
        if len(floats) > 1:
            raise EvalError("E014", f"dtype mismatch in {what} for tensor '{ctx.tensor}': "
                            + ", ".join(sorted({x.dtype for x in xs if x.dtype})), span, "cannot combine integer and float tensors")

    def binop(self, e: ir.Bin, a, b, ctx: TensorCtx):
        if e.op in ("==", "!="):
            return (a == b) if e.op == "==" else (a != b)
        ta, tb = isinstance(a, TensorV), isinstance(b, TensorV)
        if not ta and not tb:
            if isinstance(a, list) or isinstance(b, list):
                raise EvalError("E005", f"cannot apply '{e.op}' to a list", e.span,
                                "apply it to each element: [x * 2 for x in xs]")
            if e.op == "/" and b == 0:
                raise EvalError("E006", "division by zero", e.span, "divide by a non-zero number")
            return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[e.op]()
        if ta and tb:
            if e.op == "/":
                raise EvalError("E005", "cannot divide a model by a model", e.span, "divide by a number")
            self._same_shape([a, b], self.site or e.span, ctx, f"'{e.op}'")
            op = {"+": "add", "-": "sub", "*": "mul"}[e.op]
            return TensorV(self.plan.add(op, (a.node, b.node), {}, group=ctx.group, loc=self._loc(e.span), shape=a.shape),
                           a.shape, a.dtype)
        t, k = (a, b) if ta else (b, a)
        if isinstance(k, list):
            k = arch.gradient_value([float(x) for x in k], ctx.t)
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            raise EvalError("E005", f"cannot apply '{e.op}' to a model and a {type(k).__name__}", e.span,
                            "models combine with models (+, -) and with numbers (*, /)")
        if e.op == "*":
            return self.scale(t, k, ctx, e.span)
        if e.op == "/" and ta:
            if k == 0:
                raise EvalError("E006", "division by zero", e.span, "divide by a non-zero number")
            return self.scale(t, 1.0 / k, ctx, e.span)
        raise EvalError("E005", f"cannot apply '{e.op}' to a model and a number", e.span,
                        "models can be added to models and scaled by numbers")

    def call_args(self, e: ir.CallE, env: tuple, ctx: TensorCtx) -> dict:
        out = {n: self.eval(a, env, ctx) for n, a in zip(param_names(self.prog, e), e.args)}
        for k, v in e.kwargs:
            out[k] = self.eval(v, env, ctx)
        return out

    def call(self, e: ir.CallE, env: tuple, ctx: TensorCtx):
        if e.kind == "builtin" and e.target == "layers":
            args = {p: a for p, a in zip(("model", "start", "end"), e.args)} | dict(e.kwargs)
            start, end = (self.eval(args[k], env, ctx) for k in ("start", "end"))
            return SliceV(args["model"], env, int(start), int(end), e.span)
        if e.kind == "builtin" and e.target == "slices" and self.dry:
            return self.load("model", ctx, e.span)
        if e.kind == "builtin" and e.target == "slices":
            raise EvalError("E005", "slices() must be the whole value of a merge", e.span,
                            "write `merge deep = slices([...])` and use `deep` elsewhere")
        if e.kind == "builtin" and e.target == "tune":
            from .tuning import first_value

            return first_value(self.prog, e)  # `run` substitutes the chosen value before lowering
        args = self.call_args(e, env, ctx)
        if e.kind == "builtin":
            if e.target in SOURCE_BUILTINS:
                return self.load(self.source(e, args), ctx, e.span)
            if e.target == "ramp":
                a, b = float(args["start"]), float(args["end"])
                return a + (b - a) * ctx.t
            raise AssertionError(e.target)
        if e.kind == "def":
            d = self.prog.defs[e.target]
            exprs = self._arg_exprs(e)
            local: list = []
            for p in d.params:
                if p.name in args:
                    local.append((p.name, args[p.name]))
                    origin = self._origin(exprs.get(p.name), env, e.target.split("::")[-1], p.name)
                    if origin is not None:
                        local.append((_origin_key(p.name), origin))
                else:
                    local.append((p.name, self.eval(p.default, (), ctx) if p.default is not None else None))
            return self.eval(d.body, tuple(local), ctx)
        return self.apply_op(e, args, ctx, env)

    def _arg_exprs(self, e: ir.CallE) -> dict[str, ir.Expr]:
        if e.kind == "def":
            names = [p.name for p in self.prog.defs[e.target].params]
        elif e.kind == "op":
            names = [p.name for p in OPS[e.target].params]
        else:
            return {}
        return dict(zip(names, e.args)) | dict(e.kwargs)

    def _origin(self, expr: ir.Expr | None, env: tuple, func: str, param: str) -> _Origin | None:
        """The user's argument a value comes from: an expression in the spec file, or a
        parameter of an enclosing def call that has one."""
        if expr is None:
            return None
        inherited = self._param_origin(expr, env)
        if inherited is not None:
            return inherited
        if expr.span.file == self.prog.file:
            return _Origin(expr.span, func, param)
        return None

    def _param_origin(self, expr: ir.Expr | None, env: tuple) -> _Origin | None:
        """The origin of a def parameter that `expr` names, if it has one."""
        if isinstance(expr, ir.Ref) and expr.scope == "local":
            try:
                return self._lookup(env, _origin_key(expr.name))
            except KeyError:
                return None
        return None

    def _param_error(self, d: Diagnostic, e: ir.CallE, exprs: dict, env: tuple, pname: str, value, p) -> Diagnostic:
        """A bad op argument, reported at the user's argument it came from (through defs),
        naming the function the user called; else at the call."""
        origin = self._param_origin(exprs.get(pname), env)
        if origin is None:
            return Diagnostic(d.code, d.message + self._via(e.span), self.site or e.span, d.hint)
        via = f" (passed to {e.target} at {os.path.basename(e.span.file)}:{e.span.line})"
        if p is None:  # not a single value's check (e.g. the weights count)
            return Diagnostic(d.code, d.message.replace(f"'{e.target}'", f"'{origin.func}'") + via, origin.span, d.hint)
        sink = DiagnosticSink()
        check_param_value(sink, origin.param, origin.func, p.choices, p.range, p.type, value, origin.span)
        o = sink.items[-1] if sink.items else d
        return Diagnostic(o.code, o.message + via, origin.span, o.hint)

    def apply_op(self, e: ir.CallE, args: dict, ctx: TensorCtx, env: tuple = ()):
        o = OPS[e.target]
        inputs: list[TensorV] = []
        params: dict = {}
        sink = DiagnosticSink()
        exprs = self._arg_exprs(e)
        bad: list[Diagnostic] = []
        for p in o.params:
            v = args.get(p.name, None if p.required else p.default)
            if p.type == "tensor":
                if not isinstance(v, TensorV):
                    raise EvalError("E005", f"argument '{p.name}' of '{o.name}' must be a model", e.span,
                                    "pass a model name or a merge expression")
                inputs.append(v)
            elif p.type == "tensors":
                if not isinstance(v, list) or not v or not all(isinstance(x, TensorV) for x in v):
                    raise EvalError("E005", f"argument '{p.name}' of '{o.name}' must be a non-empty list of models",
                                    e.span, "pass a `models` list or [a, b, ...]")
                inputs.extend(v)
                params["n"] = len(v)
            else:
                if v is None:
                    if p.optional:
                        continue
                    raise EvalError("E005", f"argument '{p.name}' of '{o.name}' cannot be none", e.span,
                                    "pass a value, or leave the argument out to use its default")
                if p.type in ("number", "int") and isinstance(v, list):
                    v = arch.gradient_value([float(x) for x in v], ctx.t)
                if p.type == "numbers":
                    if not isinstance(v, list) or not all(isinstance(x, (int, float)) for x in v):
                        raise EvalError("E005", f"argument '{p.name}' of '{o.name}' must be a list of numbers",
                                    e.span, "write the values as [0.5, 0.3, ...]")
                    v = [float(x) for x in v]
                if not check_param_value(sink, p.name, o.name, p.choices, p.range, p.type, v, e.span):
                    bad.append(self._param_error(sink.items[-1], e, exprs, env, p.name, v, p))
                    continue  # report every bad argument of the call at once
                params[p.name] = int(v) if p.type == "int" else float(v) if p.type == "number" else v
        if "n" in params and "weights" in params and len(params["weights"]) != params["n"]:
            d = Diagnostic("E006", f"{len(params['weights'])} weights for {params['n']} models in '{o.name}'", e.span,
                           "give one weight per model")
            bad.append(self._param_error(d, e, exprs, env, "weights", params["weights"], None))
        elif "weights" in params and params.get("normalize") and weights_sum_is_zero(params["weights"]):
            d = Diagnostic("E006", f"the weights of '{o.name}' sum to 0, so normalize=true cannot divide by their sum",
                           e.span, "pass normalize=false to add the weighted models without dividing, or change the weights")
            bad.append(self._param_error(d, e, exprs, env, "weights", params["weights"], None))
        if bad and self.dry:
            # keep going: other calls of the merge may have bad arguments too
            for d in bad:
                self._report(d)
            return TensorV(self.plan.add(o.name, tuple(x.node for x in inputs), {}, group=ctx.group), None, None)
        if bad:
            raise EvalError(bad[0].code, bad[0].message, bad[0].span, bad[0].hint, tuple(bad[1:]))
        self._same_shape(inputs, self.site or e.span, ctx, f"'{o.name}'")
        shape = inputs[0].shape if inputs else None
        dtype = inputs[0].dtype if inputs else None
        node_ids = tuple(x.node for x in inputs)
        loc = self._loc(e.span)
        if o.name == "drop":
            params["seed"] = tensor_seed(params.get("seed", 0), ctx.group, self.signature(node_ids[0]))
        if o.name == "trim" and params.get("scope") == "model":
            return TensorV(self.model_trim(node_ids[0], params["density"], ctx, loc), shape, dtype)
        if o.name == "drop" and not self.dry:
            x, base = node_ids[0], {"density": params["density"], "seed": params["seed"]}
            if params["density"] >= 1.0:
                return inputs[0]
            if params["rescale"] == "l1":
                factor = self.plan.add("drop_l1_factor", (x,), base, group=ctx.group, loc=loc)
            else:
                k = 1.0 / params["density"] if params["rescale"] == "inverse" and params["density"] > 0 else 1.0
                factor = self.plan.add("const", (), {"value": k}, group=ctx.group, loc=loc)
            return TensorV(self.plan.add("drop_rows", (x, factor), base, group=ctx.group, loc=loc, shape=shape),
                           shape, dtype)
        if o.name == "trim" and not self.dry:
            # NOTE: the threshold is a small per-tensor value; the trim itself is then
            # row-wise, so the split pass can compute big tensors in row blocks.
            info = self.plan.add("topk_threshold", node_ids, {"density": params["density"]}, group=ctx.group, loc=loc)
            return TensorV(self.plan.add("trim_topk", (node_ids[0], info), {}, group=ctx.group, loc=loc, shape=shape),
                           shape, dtype)
        params.pop("n", None)
        return TensorV(self.plan.add(o.name, node_ids, params, group=ctx.group, loc=loc, shape=shape), shape, dtype)

    def _via(self, span: Span) -> str:
        if span.file != self.prog.file:
            return f" (in {os.path.basename(span.file)}:{span.line})"
        return ""

    # ------------------------------------------------------------------ model-wide statistics
    def signature(self, nid: str) -> str:
        """A tensor-independent structural hash: equal for the same expression on every tensor."""
        if nid not in self._sig:
            n = self.plan.nodes.get(nid)
            if n is None and nid.startswith(("thr-", "bkt-")):
                # a model-wide statistic added by finish_stats(): its id already hashes its
                # tensor-independent key (e.g. a DARE seed over a scope="model" TIES)
                return nid
            params = [(k, v) for k, v in n.params if not (n.op == "load" and k == "tensor")]
            text = repr((n.op, params, [self.signature(i) for i in n.inputs]))
            self._sig[nid] = hashlib.sha1(text.encode()).hexdigest()[:16]
        return self._sig[nid]

    def model_trim(self, x: str, density: float, ctx: TensorCtx, loc: str) -> str:
        if self.dry:
            return self.plan.add("trim", (x,), {"density": density, "scope": "model"}, group=ctx.group, loc=loc)
        key = f"{self.signature(x)}:{density!r}"
        st = self.stats.setdefault(key, {"density": density, "xs": {}, "loc": loc,
                                         "thr": "thr-" + hashlib.sha1(key.encode()).hexdigest()[:12],
                                         "bucket": "bkt-" + hashlib.sha1(key.encode()).hexdigest()[:12]})
        st["xs"][x] = ctx.group
        return self.plan.add("trim_at", (x, st["thr"]), {}, group=ctx.group, loc=loc, shape=self.plan.nodes[x].shape)

    def finish_stats(self) -> None:
        for st in self.stats.values():
            his = [self.plan.add("magnitude_hist_hi", (x,), {}, group=g, loc=st["loc"]) for x, g in st["xs"].items()]
            add_with_id(self.plan, st["bucket"], "select_bucket", tuple(his), {"density": st["density"]}, loc=st["loc"])
            los = [self.plan.add("magnitude_hist_lo", (x, st["bucket"]), {}, group=g, loc=st["loc"]) for x, g in st["xs"].items()]
            add_with_id(self.plan, st["thr"], "select_threshold", tuple(los) + (st["bucket"],), {}, loc=st["loc"])


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


def _at(span: Span) -> tuple:
    """A span as the plan stores it: (file, line, column, end line, end column)."""
    return (span.file, span.line, span.col, span.end_line, span.end_col)


def lower(prog: ir.Program) -> Plan:
    """Lower a checked program to an (unoptimized) plan; raises FuseErrors."""
    return Lowerer(prog).lower()


def dry_check(prog: ir.Program) -> None:
    Lowerer(prog, dry=True).dry_check()


__all__ = ["FuseErrors", "Lowerer", "dry_check", "lower"]
