"""The tensors a merge's output has (its domain): the first model it reads, or for
`slices` (MergeKit passthrough) the layers of several models renumbered in order; and
which tensor of which input each output tensor is evaluated at."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import arch, ir
from ..lang.diagnostics import Span
from ..runtime.sources import is_source_call
from . import adapter_values, lora_values, moe_values, smile_values, wemoe_values
from .evaluate import Evaluator
from .values import PROBE, EvalError, SliceV, TensorCtx


@dataclass
class Domain:
    names: list[str]  # output tensor names, in reference order
    reference: str  # source key
    num_layers: int
    source_of: dict[str, tuple[int, str, int | None, int]] = field(default_factory=dict)  # slices: out -> (slice#, src name, src layer, src layers)
    config_overrides: dict = field(default_factory=dict)
    note: str = ""  # shown with the output in `compile` (a MoE's parameter counts)
    group_of: dict[str, str] = field(default_factory=dict)  # out -> the tensor group computing it, when shared
    description: dict = field(default_factory=dict)  # SMILE / WEMoE (`arch.upscaled`); a LoRA adapter (`arch.lora`)
    tokenizer: str = ""  # a tokenizer(...) merge: its vocabulary spec (`arch.vocab.build`), written with the output


class Domains(Evaluator):
    """An Evaluator that knows each merge's output tensors (its domain)."""

    def eval_binding(self, b: ir.Binding, ctx: TensorCtx):
        tc = moe_values.moe_call(self, b, "tokenizer")
        if tc is not None and not self.dry:
            from . import vocab_values

            prev = getattr(self, "vocab", None)
            self.vocab = vocab_values.spec(self, b, tc)
            try:
                return self._eval_binding(b, ctx, tc.args[0])
            finally:
                self.vocab = prev
        return self._eval_binding(b, ctx, b.value)

    def _eval_binding(self, b: ir.Binding, ctx: TensorCtx, value: ir.Expr):
        for i, r in enumerate(b.rules):
            m = re.match(r.regex, ctx.tensor)
            if m:
                self.rules_used.add((b.qualname, i))
                env = tuple((c, int(m.group(c))) for c in r.captures)
                return self.eval(r.value, env, ctx)
        sl = self.slices_call(b)
        if sl is not None and not self.dry:
            return self.eval_slices(sl, ctx)
        mc = moe_values.moe_call(self, b)
        if mc is not None and not self.dry:
            return moe_values.eval_moe(self, mc, ctx)
        sc = moe_values.moe_call(self, b, "smile")
        if sc is not None and not self.dry:
            return smile_values.eval_smile(self, sc, ctx)
        wc = moe_values.moe_call(self, b, "wemoe")
        if wc is not None and not self.dry:
            return wemoe_values.eval_wemoe(self, wc, ctx)
        lc = moe_values.moe_call(self, b, "extract_lora")
        if lc is not None and not self.dry:
            return lora_values.eval_lora(self, lc, ctx)
        ac = moe_values.moe_call(self, b, "merge_adapters")
        if ac is not None and not self.dry:
            return adapter_values.eval_merge(self, ac, ctx)
        return self.eval(value, (), ctx)

    def eval_slices(self, call: ir.CallE, ctx: TensorCtx):
        dom = self._slices_cache = getattr(self, "_slices_cache", None) or {}
        key = id(call)
        if key not in dom:  # per slices() call, not per tensor
            dom[key] = (self.slice_parts(call), self.slices_domain(call))
        parts, domain = dom[key]
        si, src, layer, n = domain.source_of.get(ctx.group, (0, ctx.tensor, None, 0))
        p = parts[si]
        if not p.merged:
            return self.eval(p.expr, p.env, TensorCtx(src, ctx.group, layer, n))
        # MergeKit: a layer's gradient position is its offset in the slice, j / (L - 1);
        # the tensors before and after the stack take position 0
        length, j = p.end - p.start, layer - p.start if layer is not None else 0
        if layer is None:
            inner = TensorCtx(src, ctx.group, None, 2)  # position 0
        elif length == 1:
            inner = TensorCtx(src, ctx.group, 1, 2)  # MergeKit: t = 1 in a one-layer slice
        else:
            inner = TensorCtx(src, ctx.group, j, length)
        self._slice_offset = j
        try:
            return self.eval(p.expr, p.env, inner)
        finally:
            self._slice_offset = None

    def slice_parts(self, call: ir.CallE) -> list[SliceV]:
        """The slices of a slices([...]) call: a `layers(m, start, end)` item as is; any
        other item a merged slice (its models layers() calls of one length)."""
        probe = TensorCtx(PROBE, PROBE, 0, 2)
        items = call.args[0]
        while isinstance(items, ir.Ref) and items.scope == "global" and items.name in self.prog.bindings:
            items = self.prog.bindings[items.name].value
        if not isinstance(items, ir.ListE):
            return self.eval(call.args[0], (), probe)
        parts = []
        for item in items.items:
            if isinstance(item, ir.CallE) and item.kind == "builtin" and item.target == "layers":
                parts.append(self.eval(item, (), probe))
                continue
            inner = [n for n in ir.walk_expr(item)
                     if isinstance(n, ir.CallE) and n.kind == "builtin" and n.target == "layers"]
            if not inner:
                parts.append(self.eval(item, (), probe))  # reported below as not a slice
                continue
            ranges = [self.eval(c, (), probe) for c in inner]
            lengths = {r.end - r.start for r in ranges}
            if len(lengths) > 1:
                raise EvalError("E006", "the layer ranges merged in one slice must have one length (here "
                                + ", ".join(f"[{r.start}, {r.end})" for r in ranges) + ")", item.span,
                                "merge layer ranges of equal length, e.g. layers(a, 0, 8) with layers(b, 8, 16)")
            self._models_outside_layers(item)
            parts.append(SliceV(item, (), ranges[0].start, ranges[0].end, item.span, merged=True))
        return parts

    def _models_outside_layers(self, e: ir.Expr) -> None:
        """E005 where a merged slice reads a model other than through layers(...): which of
        its layers would be meant is undefined."""
        if isinstance(e, ir.CallE) and e.kind == "builtin" and e.target == "layers":
            return
        if (isinstance(e, ir.CallE) and is_source_call(e)) or (
                isinstance(e, ir.Ref) and e.scope == "global" and e.name in self.prog.bindings
                and self.prog.bindings[e.name].kind in ("model", "models", "merge")):
            raise EvalError("E005", "a merged slice reads its models through layers(model, start, end)", e.span,
                            "write layers(m, start, end) for every model of the slice")
        for c in ir.children(e):
            self._models_outside_layers(c)

    def first_source(self, e: ir.Expr) -> ir.CallE | None:
        """The first model source an expression reads: its output has that model's tensors."""
        found = self.source_calls(e, first=True)
        return found[0] if found else None

    def source_calls(self, e: ir.Expr, first: bool = False, seen: set[str] | None = None,
                     out: list | None = None) -> list[ir.CallE]:
        """The model source calls (local, hf, zoo, lora) an expression reads, in reading
        order, through merges and defs (a slices() merge is not looked into); with
        `first`, stop at the first."""
        seen = seen if seen is not None else set()
        out = out if out is not None else []
        if first and out:
            return out
        if isinstance(e, ir.CallE):
            if is_source_call(e):
                out.append(e)
                return out
            if e.kind == "builtin" and e.target == "slices":
                return out
            for a in list(e.args) + [v for _, v in e.kwargs]:
                self.source_calls(a, first, seen, out)
            if e.kind == "def":
                self.source_calls(self.prog.defs[e.target].body, first, seen, out)
            return out
        if isinstance(e, ir.Ref) and e.scope == "global" and e.name not in seen:
            seen.add(e.name)
            b = self.prog.bindings.get(e.name)
            if b is None:
                return out
            self.source_calls(b.value, first, seen, out)
            for rule in b.rules:
                self.source_calls(rule.value, first, seen, out)
            return out
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
            self.source_calls(c, first, seen, out)
        return out

    def slices_call(self, b: ir.Binding) -> ir.CallE | None:
        v = b.value
        while isinstance(v, ir.Ref) and v.scope == "global" and v.name in self.prog.bindings:
            b = self.prog.bindings[v.name]
            v = b.value
        return v if isinstance(v, ir.CallE) and v.kind == "builtin" and v.target == "slices" else None

    def domain(self, b: ir.Binding) -> Domain:
        sl = self.slices_call(b)
        if sl is not None:
            return self.slices_domain(sl)
        mc = moe_values.moe_call(self, b)
        if mc is not None:
            return Domain(**moe_values.domain(self, mc))
        sc = moe_values.moe_call(self, b, "smile")
        if sc is not None:
            return Domain(**smile_values.domain(self, sc))
        wc = moe_values.moe_call(self, b, "wemoe")
        if wc is not None:
            return Domain(**wemoe_values.domain(self, wc))
        lc = moe_values.moe_call(self, b, "extract_lora")
        if lc is not None:
            return Domain(**lora_values.domain(self, lc))
        ac = moe_values.moe_call(self, b, "merge_adapters")
        if ac is not None:
            return Domain(**adapter_values.merge_domain(self, ac))
        call = self.first_source(b.value)
        if call is None:
            raise EvalError("E013", f"'{b.qualname.split('::')[-1]}' reads no model", b.span,
                            "a merge needs at least one input model")
        args = self.call_args(call, (), TensorCtx(PROBE, PROBE, 0, 2))
        key = self.source(call, args)
        h = self.headers[key]
        names = list(h.tensors)
        dom = Domain(names, key, arch.count_layers(h.config, names))
        tc = moe_values.moe_call(self, b, "tokenizer")
        if tc is not None:
            from . import vocab_values

            vs = vocab_values.spec(self, b, tc)
            dom.tokenizer = vs["json"]
            dom.config_overrides = {"vocab_size": vs["size"]}
            dom.note = f"tokenizer: {len(vs['tokenizer'])} tokens ({vs['size']} rows) from {len(vs['keys'])} models"
        return dom

    def slices_domain(self, call: ir.CallE) -> Domain:
        """The output tensors of a `slices([...])` merge (MergeKit passthrough): the first
        slice's embeddings, each slice's layers renumbered in order, the last slice's
        final norm and head. Every tensor must have the reference (first) model's shape,
        and the per-layer config lists follow the source layers (`arch.slice_config_overrides`)."""
        parts = self.slice_parts(call)
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
            if p.merged:  # a merged slice's layout: its first layers() model's
                inner = [n for n in ir.walk_expr(p.expr)
                         if isinstance(n, ir.CallE) and n.kind == "builtin" and n.target == "layers"]
                for c in inner[1:]:
                    self._check_range(c)
                scall = self.first_source(inner[0].args[0])
            else:
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
        return Domain(names, ref_key, out_layer, source_of, overrides)

    def _check_range(self, c: ir.CallE) -> None:
        """E006 unless the range of layers(m, start, end) lies within m's layers."""
        probe = TensorCtx(PROBE, PROBE, 0, 2)
        r = self.eval(c, (), probe)
        scall = self.first_source(r.expr)
        if scall is None:
            raise EvalError("E013", "layers() needs a model", c.span, "write layers(model, start, end)")
        h = self.headers[self.source(scall, self.call_args(scall, (), probe))]
        n = arch.count_layers(h.config, h.tensors)
        if not (0 <= r.start < r.end <= n):
            raise EvalError("E006", f"layer range [{r.start}, {r.end}) is outside the model's {n} layers", c.span,
                            f"valid ranges lie within [0, {n}); the end is exclusive")

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

