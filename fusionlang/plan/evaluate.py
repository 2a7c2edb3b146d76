"""Evaluation of a checked Program, per tensor name, into plan nodes.

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
import os

from .. import arch, ir
from ..arch.vocab import VOCAB_TENSOR
from ..lang.diagnostics import Diagnostic, DiagnosticSink, Span
from ..lang.values import check_param_value
from ..ops import OPS
from ..ops.arith import weights_sum_is_zero
from ..ops.sparsify import tensor_seed
from ..runtime.sources import (
    SOURCE_BUILTINS,
    ModelHeader,
    SourceError,
    is_source_call,
    read_model_dir,
    source_dir,
)
from . import align_values, stage_values
from .graph import Plan, SourceSpec, add_with_id
from .values import (
    FLOAT_DTYPES,
    EvalError,
    MissingTensor,
    Origin,
    PerModelV,
    SliceV,
    TensorCtx,
    TensorV,
    at,
    origin_key,
    param_names,
)

# ops whose `seed` becomes a per-tensor seed (the tensor's group and input expression)
SEEDED_OPS = ("drop", "magprune")


class Evaluator:
    """A partial evaluator of a checked Program at one tensor name at a time: models
    become plan nodes (`TensorV`), numbers and lists stay values, `def` calls are
    inlined, op calls become plan nodes with checked arguments. `dry`: no model files;
    sources are named, not read. Errors are EvalError (a located Diagnostic)."""

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
                                            header.config, at=at(call.span))
        self.sources_used[key] = call.span
        return key

    def load(self, key: str, ctx: TensorCtx, span: Span) -> TensorV:
        """Model source `key`'s tensor at `ctx`; inside a `tokenizer(...)` merge a
        token-indexed tensor comes in the output vocabulary's row order."""
        vs = getattr(self, "vocab", None)
        if vs is not None and not self.dry:
            from .vocab_values import load as vocab_load

            v = vocab_load(self, vs, key, ctx, span)
            if v is not None:
                return v
        return self.raw_load(key, ctx, span)

    def raw_load(self, key: str, ctx: TensorCtx, span: Span) -> TensorV:
        if self.dry:
            return TensorV(self.plan.add("load", (), {"source": key, "tensor": ctx.tensor}, group=ctx.group), None, None)
        src = self.plan.sources[key]
        if ctx.tensor not in src.tensors:
            raise MissingTensor(key, ctx.tensor, span)
        dtype, shape, _ = src.tensors[ctx.tensor]
        nid = self.plan.add("load", (), {"source": key, "tensor": ctx.tensor}, group=ctx.group, loc=self._loc(span), shape=shape)
        return TensorV(nid, shape, dtype)

    def _report(self, d: Diagnostic) -> None:
        key = (d.code, d.message, d.span)
        if key not in self._warned:
            self._warned.add(key)
            self.sink.items.append(d)

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
                v = self._lookup(env, e.name)
                return self._per_model(v) if isinstance(v, PerModelV) else v
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
            stack = self.__dict__.setdefault("_comps", [])
            out = []
            for i, x in enumerate(it):  # per_model() values resolve to the item's index
                stack.append((len(it), i))
                try:
                    out.append(self.eval(e.body, env + ((e.var, x),), ctx))
                finally:
                    stack.pop()
            return out
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
                origin = self._param_origin(e.index, env)  # an index passed to a def: at the user's argument
                where = f" ('{origin.param}' of '{origin.func}', used at {os.path.basename(e.span.file)}:{e.span.line})" \
                    if origin else ""
                raise EvalError("E006", f"index {int(i)} is out of range for a list of {len(v)}{where}",
                                origin.span if origin else e.index.span, f"valid indices are 0..{len(v) - 1}")
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
            hint = "models must share an architecture; use a rule to treat this tensor separately (e.g. => base)"
            if VOCAB_TENSOR.search(ctx.tensor) and len({s[1:] for s in shapes}) == 1:
                hint = ("the models' vocabularies differ (added tokens): merge them with their rows aligned by token, "
                        "`merge m = tokenizer(<the merge>, source=\"union\")` (or \"base\", or a model)")
            raise EvalError("E014", f"shape mismatch in {what} for tensor '{ctx.tensor}': "
                            + " vs ".join(str(list(s)) for s in sorted(shapes)), span, hint)
        floats = {x.dtype in FLOAT_DTYPES for x in xs if x.dtype}
        if len(floats) > 1:
            raise EvalError("E014", f"dtype mismatch in {what} for tensor '{ctx.tensor}': "
                            + ", ".join(sorted({x.dtype for x in xs if x.dtype})), span, "cannot combine integer and float tensors")

    def _per_model(self, v: PerModelV):
        """v's value for the model the innermost comprehension over as many items is at;
        v itself outside one (an error where it is used)."""
        for n, i in reversed(self.__dict__.get("_comps", [])):
            if n == len(v.values):
                return v.values[i]
        return v

    def _no_per_model(self, values, where: str) -> None:
        for v in values:
            if isinstance(v, PerModelV):
                raise EvalError("E006", f"per_model() gives one value per model, and {where} takes one value for "
                                "all models", v.span, "pass it to a method argument applied to each model in turn, "
                                "e.g. ties(base, experts, density=per_model([0.5, 0.3])) with two experts")

    def binop(self, e: ir.Bin, a, b, ctx: TensorCtx):
        self._no_per_model((a, b), f"'{e.op}'")
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
        if e.kind == "builtin" and e.target == "per_model":
            vals = self.eval(e.args[0], env, ctx)
            if not isinstance(vals, list) or len(vals) < 1 or isinstance(vals[0], TensorV):
                raise EvalError("E005", "per_model() takes a list of values, one per model", e.span,
                                "e.g. density=per_model([0.5, 0.3]) for two models")
            return PerModelV(tuple(vals), e.span)
        if e.kind == "builtin" and e.target == "layers":
            args = {p: a for p, a in zip(("model", "start", "end"), e.args)} | dict(e.kwargs)
            start, end = (self.eval(args[k], env, ctx) for k in ("start", "end"))
            j = self.__dict__.get("_slice_offset")
            if j is not None:  # inside a merged slice: this model's layer start + j
                s = arch.split_layer(ctx.tensor)
                name = f"{s[0]}.{int(start) + j}.{s[2]}" if s else ctx.tensor
                return self.eval(args["model"], env, TensorCtx(name, ctx.group, ctx.layer, ctx.num_layers, ctx.output))
            return SliceV(args["model"], env, int(start), int(end), e.span)
        if e.kind == "builtin" and e.target == "slices" and self.dry:
            return self.load("model", ctx, e.span)
        if e.kind == "builtin" and e.target == "slices":
            raise EvalError("E005", "slices() must be the whole value of a merge", e.span,
                            "write `merge deep = slices([...])` and use `deep` elsewhere")
        if e.kind == "builtin" and e.target == "tokenizer":
            if self.dry:
                from .vocab_values import options as vocab_options

                vocab_options(self, e, env)
                return self.eval(e.args[0], env, ctx)
            raise EvalError("E005", "tokenizer() must be the whole value of a merge", e.span,
                            "write `merge m = tokenizer(ties(base, experts), source=\"union\")` and use `m` elsewhere")
        if e.kind == "builtin" and e.target == "merge_adapters":
            if self.dry:
                return self.load("model", ctx, e.span)
            raise EvalError("E005", "merge_adapters() must be the whole value of a merge", e.span,
                            "write `merge m = merge_adapters([...], weights=[...])` and save `m`")
        if e.kind == "builtin" and e.target in ("moe", "smile", "wemoe", "extract_lora"):
            if self.dry:
                from .lora_values import options as lora_options
                from .moe_values import options as moe_options
                from .smile_values import options as smile_options
                from .wemoe_values import options as wemoe_options

                options = {"moe": moe_options, "smile": smile_options, "wemoe": wemoe_options,
                           "extract_lora": lora_options}[e.target]
                options(self, e)  # the arguments that need no model files
                return self.load("model", ctx, e.span)
            raise EvalError("E005", f"{e.target}() must be the whole value of a merge", e.span,
                            f"write `merge m = {e.target}(base, {'model' if e.target == 'extract_lora' else 'experts'}, "
                            "...)` and use `m` elsewhere")
        if e.kind == "builtin" and e.target == "tune":
            return ir.tune_first_value(self.prog, e)  # `run` substitutes the chosen value before lowering
        args = self.call_args(e, env, ctx)
        if e.kind == "builtin":
            if e.target in SOURCE_BUILTINS:
                return self.load(self.source(e, args), ctx, e.span)
            if e.target in stage_values.STAGE_BUILTINS:
                return stage_values.call(self, e, args, ctx, env)
            if e.target == "bitdelta_stats":
                from .bitdelta_values import call as bitdelta_stats

                return bitdelta_stats(self, e, args, ctx, env)
            if e.target in align_values.ALIGN_BUILTINS:
                return align_values.call(self, e, args, ctx, env)
            if e.target == "lora":
                from .adapter_values import apply_lora

                return apply_lora(self, e, args, ctx)
            if e.target == "ramp":
                a, b = float(args["start"]), float(args["end"])
                return a + (b - a) * ctx.t
            if e.target == "between":
                raise EvalError("E019", "between() is a search range: it belongs in tune()", e.span,
                                "e.g. scale=tune(between(0.1, 1.0), on=[task1], budget=16)")
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
                        local.append((origin_key(p.name), origin))
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

    def _origin(self, expr: ir.Expr | None, env: tuple, func: str, param: str) -> Origin | None:
        """The user's argument a value comes from: an expression in the spec file, or a
        parameter of an enclosing def call that has one."""
        if expr is None:
            return None
        inherited = self._param_origin(expr, env)
        if inherited is not None:
            return inherited
        if expr.span.file == self.prog.file:
            return Origin(expr.span, func, param)
        return None

    def _param_origin(self, expr: ir.Expr | None, env: tuple) -> Origin | None:
        """The origin of a def parameter that `expr` names, if it has one."""
        if isinstance(expr, ir.Ref) and expr.scope == "local":
            try:
                return self._lookup(env, origin_key(expr.name))
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
        self._no_per_model(args.values(), f"'{o.name}'")
        inputs: list[TensorV] = []
        lists: list[list[TensorV]] = []
        n_list: int | None = None  # NOTE: the first list's length (not a param: ops may have an `n`)
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
                lists.append(v)
                n_list = len(v) if n_list is None else n_list
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
        if n_list is not None and "weights" in params and len(params["weights"]) != n_list:
            d = Diagnostic("E006", f"{len(params['weights'])} weights for {n_list} models in '{o.name}'", e.span,
                           "give one weight per model")
            bad.append(self._param_error(d, e, exprs, env, "weights", params["weights"], None))
        elif "weights" in params and params.get("normalize") and weights_sum_is_zero(params["weights"]):
            d = Diagnostic("E006", f"the weights of '{o.name}' sum to 0, so normalize=true cannot divide by their sum",
                           e.span, "pass normalize=false to add the weighted models without dividing, or change the weights")
            bad.append(self._param_error(d, e, exprs, env, "weights", params["weights"], None))
        problem = o.check_values({**params, "_n": n_list}) if o.check_values and not bad else None
        if problem:
            pname, message, hint = problem
            d = Diagnostic("E006", f"{message} in '{o.name}'", e.span, hint)
            bad.append(self._param_error(d, e, exprs, env, pname, params.get(pname), None))
        if not bad and o.check_args:
            problem = o.check_args([x.shape for x in inputs], params)
            if problem:
                d = Diagnostic("E006", f"{problem[1]} in '{o.name}'", e.span, problem[2])
                bad.append(self._param_error(d, e, exprs, env, problem[0], params.get(problem[0]), None))
        if bad and self.dry:
            # keep going: other calls of the merge may have bad arguments too
            for d in bad:
                self._report(d)
            return TensorV(self.plan.add(o.name, tuple(x.node for x in inputs), {}, group=ctx.group), None, None)
        if bad:
            raise EvalError(bad[0].code, bad[0].message, bad[0].span, bad[0].hint, tuple(bad[1:]))
        if len(lists) > 1:  # e.g. models and their statistics: each list is checked on its own
            singles = [v for p in o.params if p.type == "tensor" for v in [args.get(p.name)] if isinstance(v, TensorV)]
            for k, group in enumerate(lists):
                self._same_shape(singles + group if k == 0 else group, self.site or e.span, ctx, f"'{o.name}'")
            problem = o.check_shapes([[x.shape for x in g] for g in lists]) if o.check_shapes else None
            if problem:
                raise EvalError("E014", f"{problem} in '{o.name}' for tensor '{ctx.tensor}'", self.site or e.span,
                                "pass each model's own statistic of the kind the method needs")
            params["sizes"] = [len(g) for g in lists]
        else:
            self._same_shape(inputs, self.site or e.span, ctx, f"'{o.name}'")
        shape = inputs[0].shape if inputs else None
        dtype = inputs[0].dtype if inputs else None
        node_ids = tuple(x.node for x in inputs)
        loc = self._loc(e.span)
        if o.name in SEEDED_OPS:
            params["seed"] = tensor_seed(params.get("seed", 0), ctx.group, self.signature(node_ids[0]))
        if o.name == "opcm_fold":  # OPCM projects Linear weights: 2-D tensors outside the embeddings
            params["_project"] = bool(shape is not None and len(shape) == 2 and not arch.is_pre_layer(ctx.tensor))
        if o.name == "model_sum":  # NOTE: a scalar: shape None, so no shape check against tensors
            return TensorV(self.model_sum(node_ids[0], ctx, loc), None, "F64")
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
            if n is None and nid.startswith(("thr-", "bkt-", "msum-")):
                # a model-wide statistic added by finish_stats(): its id already hashes its
                # tensor-independent key (e.g. a DARE seed over a scope="model" TIES)
                return nid
            # NOTE: tensor-dependent params (load's tensor, lowering's `_` params) are left out
            params = [(k, v) for k, v in n.params if not ((n.op == "load" and k == "tensor") or k.startswith("_"))]
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

    def model_sum(self, x: str, ctx: TensorCtx, loc: str) -> str:
        """`model_sum(x)`: the sum over every tensor of the per-tensor scalar x (a reduce
        node, added by finish_stats, that the tensors' groups read in a later phase)."""
        if self.dry:
            return self.plan.add("model_sum", (x,), {}, group=ctx.group, loc=loc)
        key = f"sum:{self.signature(x)}"
        st = self.stats.setdefault(key, {"sum": "msum-" + hashlib.sha1(key.encode()).hexdigest()[:12], "xs": {},
                                         "loc": loc})
        st["xs"][x] = ctx.group
        return st["sum"]

    def finish_stats(self) -> None:
        for st in self.stats.values():
            if "sum" in st:
                add_with_id(self.plan, st["sum"], "sum_scalars", tuple(st["xs"]), {}, loc=st["loc"])
                continue
            his = [self.plan.add("magnitude_hist_hi", (x,), {}, group=g, loc=st["loc"]) for x, g in st["xs"].items()]
            add_with_id(self.plan, st["bucket"], "select_bucket", tuple(his), {"density": st["density"]}, loc=st["loc"])
            los = [self.plan.add("magnitude_hist_lo", (x, st["bucket"]), {}, group=g, loc=st["loc"]) for x, g in st["xs"].items()]
            add_with_id(self.plan, st["thr"], "select_threshold", tuple(los) + (st["bucket"],), {}, loc=st["loc"])
