"""`tokenizer(merge, source="union", base=none, pad_to_multiple_of=none,
chat_template=none)`: a merge of
models whose vocabularies differ (MergeKit's `tokenizer_source` / `tokenizer:`).

As the whole value of a merge, it evaluates `merge` (and the merge's rules) with every
token-indexed tensor (embeddings, LM head: `arch.vocab.is_vocab_tensor`) of every model
the merge reads replaced by its rows in the output vocabulary's order (the `vocab_rows`
primitive), so any method merges them row by row; the output gets the output tokenizer
and config.json's vocab_size. The models are every model source the merge reads (through
its rules, merges and defs); `base` (default: the first model read) decides the union's
starting tokenizer and the default rows (arch/vocab.py).
"""

from __future__ import annotations

import json

from .. import ir
from ..arch import vocab as V
from ..arch.chat_templates import NAMED
from .values import EvalError, TensorCtx, TensorV

SOURCES = ("union", "base")


def options(ev, call: ir.CallE, env: tuple = (), probe: TensorCtx | None = None) -> dict:
    """The call's arguments, checked: {"source": "union" | "base" | TensorV, "base":
    TensorV | None, "pad_to_multiple_of": int | None}; model arguments are evaluated at
    tensor `probe` (one every input has, when not dry). EvalError (E006 / E005) at the
    argument at fault."""
    probe = probe or TensorCtx("__probe__", "__probe__", 0, 2)
    exprs = dict(zip(("merge", "source", "base", "pad_to_multiple_of", "chat_template"), call.args)) | dict(call.kwargs)
    out = {"source": "union", "base": None, "pad_to_multiple_of": None, "chat_template": None}
    for k in ("source", "base", "pad_to_multiple_of", "chat_template"):
        if k in exprs:
            out[k] = ev.eval(exprs[k], env, probe)
    src = out["source"]
    if not (isinstance(src, TensorV) or src in SOURCES):
        raise EvalError("E006", f"source={json.dumps(src) if isinstance(src, str) else src!r} is not a tokenizer source",
                        exprs["source"].span, 'source="union" (every model\'s tokens), "base" (the base model\'s), '
                        "or a model whose tokenizer the output takes")
    if out["base"] is not None and not isinstance(out["base"], TensorV):
        raise EvalError("E005", "base= of tokenizer() must be a model", exprs["base"].span,
                        "the model whose tokenizer the union starts from (default: the first model read)")
    pad = out["pad_to_multiple_of"]
    if pad is not None and not (isinstance(pad, (int, float)) and not isinstance(pad, bool) and pad == int(pad)
                                and pad >= 1):
        raise EvalError("E006", f"pad_to_multiple_of={pad!r} must be a whole number of at least 1",
                        exprs["pad_to_multiple_of"].span, "e.g. pad_to_multiple_of=64")
    out["pad_to_multiple_of"] = int(pad) if pad is not None else None
    ct = out["chat_template"]
    if not (ct is None or isinstance(ct, TensorV) or ct == "auto" or ct in NAMED
            or (isinstance(ct, str) and "{" in ct)):
        raise EvalError("E006", f"chat_template={json.dumps(ct) if isinstance(ct, str) else ct!r} is not a chat "
                        "template", exprs["chat_template"].span,
                        'chat_template="auto" (the template most of the models have), a model (its template), '
                        f"a name ({', '.join(NAMED)}) or the Jinja text of a template")
    return out


def _key(ev, v: TensorV) -> str | None:
    node = ev.plan.nodes[v.node]
    return node.param("source") if node.op == "load" else None


def spec(ev, b: ir.Binding, call: ir.CallE) -> dict:
    """The vocabulary of merge `b` (memoised per call): {"json": the `vocab_rows` spec,
    "keys": model source keys in spec order, "size": output rows, "tokenizer": the
    output tokenizer}. EvalError at the call when a tokenizer cannot be read."""
    memo = ev.__dict__.setdefault("_vocab_specs", {})
    if id(call) in memo:
        return memo[id(call)]
    probe = TensorCtx("__probe__", "__probe__", 0, 2)
    calls = ev.source_calls(call.args[0])
    for r in b.rules:
        ev.source_calls(r.value, out=calls)
    keys: list[str] = []
    for c in calls:
        k = ev.source(c, ev.call_args(c, (), probe))
        if k not in keys:
            keys.append(k)
    if not keys:
        raise EvalError("E013", "tokenizer() wraps a merge that reads no model", call.span, "merge some models")
    name = next(iter(ev.plan.sources[keys[0]].tensors))
    o = options(ev, call, (), TensorCtx(name, name, None, 0))
    base = keys[0]
    for name in ("base", "source", "chat_template"):
        v = o[name]
        if isinstance(v, TensorV):
            k = _key(ev, v)
            if k is None:
                raise EvalError("E005", f"{name}= of tokenizer() must be an input model, not a merge", call.span,
                                "name a model read from files")
            if k not in keys:
                keys.append(k)
            if name == "base":
                base = k
    source = o["source"] if isinstance(o["source"], str) else keys.index(_key(ev, o["source"]))
    ct = o["chat_template"]
    s = {"dirs": [ev.plan.sources[k].path for k in keys], "base": keys.index(base), "source": source,
         "pad_to_multiple_of": o["pad_to_multiple_of"],
         "chat_template": keys.index(_key(ev, ct)) if isinstance(ct, TensorV) else ct}
    text = json.dumps(s, sort_keys=True)
    try:
        tok, _idx, size = V.build(text)
    except (OSError, ValueError, TypeError) as err:
        bad = next((k for k in keys if not _has_tokenizer(ev.plan.sources[k].path)), keys[0])
        raise EvalError("E011", f"cannot read the tokenizer of '{bad}' ({str(err).splitlines()[0][:200]})", call.span,
                        "tokenizer() needs each model's tokenizer files (tokenizer.json or the slow tokenizer's) "
                        "next to its weights") from None
    memo[id(call)] = {"json": text, "keys": keys, "size": size, "tokenizer": tok}
    return memo[id(call)]


def _has_tokenizer(path: str) -> bool:
    try:
        V.load_tokenizer(path)
        return True
    except Exception:  # noqa: BLE001 - any failure to load means no usable tokenizer
        return False


def load(ev, vs: dict, key: str, ctx: TensorCtx, span) -> TensorV | None:
    """Model `key`'s tensor at `ctx` in the output vocabulary (a `vocab_rows` node over
    every model's tensor), or None when the tensor is not token-indexed."""
    src = ev.plan.sources[key]
    if key not in vs["keys"] or ctx.tensor not in src.tensors:
        return None
    dtype, shape, _ = src.tensors[ctx.tensor]
    if not V.is_vocab_tensor(ctx.tensor, tuple(shape), src.config):
        return None
    xs = [ev.raw_load(k, ctx, span) for k in vs["keys"]]
    for k, x in zip(vs["keys"], xs):
        if x.shape is not None and tuple(x.shape[1:]) != tuple(shape[1:]):
            raise EvalError("E014", f"'{k}' has token rows of shape {list(x.shape[1:])} in '{ctx.tensor}', '{key}' "
                            f"{list(shape[1:])}", span, "models with different hidden sizes cannot be merged")
    out_shape = (vs["size"], *shape[1:])
    nid = ev.plan.add("vocab_rows", tuple(x.node for x in xs), {"which": vs["keys"].index(key), "spec": vs["json"]},
                      group=ctx.group, loc=ev._loc(span), shape=out_shape)
    return TensorV(nid, out_shape, dtype)
