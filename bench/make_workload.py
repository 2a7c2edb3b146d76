"""Generate a benchmark workload: a random Llama base model and N experts.

    python bench/make_workload.py --params 0.5B --experts 8 --out bench/work/0.5B

Writes OUT/base and OUT/expert_1..N as Hugging Face model directories: config.json
(LlamaForCausalLM, dtype bfloat16) + bf16 safetensors shards
(model-0000k-of-0000n.safetensors, always with model.safetensors.index.json).

Weights (deterministic for a given --seed, independent of --experts):
  base:       2-D weights ~ N(0, 0.02^2) (Llama's initializer_range); norm weights = 1.
  expert_i:   bf16(base + 0.01 * rms(base_tensor) * N(0, 1)), i.e. noise whose std is 1%
              of the tensor's root-mean-square (1% of 0.02 for matrices, 0.01 for norms).
Tensors are generated directly with torch (no model instantiation) one at a time and
streamed to disk, so memory stays at about one shard. An existing, complete model
directory with the same recipe is reused (a `.workload.json` stamp records it), so
asking for more experts later only generates the missing ones.

Config for a parameter target P (vocab 32000, untied lm_head, head_dim 64,
GQA with kv_heads = largest divisor of heads <= heads/3, intermediate = 8/3*hidden
rounded up to a multiple of 256): hidden is the largest of 4096, 3072, 2048, 1536,
1024, 768, 512, 384, 256 that still leaves >= 12 layers (>= 4 below 200M parameters);
layers = round((P - 2*vocab*hidden - hidden) / params_per_layer).
  0.5B -> hidden 1536, 16 layers, 24 heads / 8 kv heads, intermediate 4096: 501.0M params.
  50M  -> hidden 512, 6 layers, 8 heads / 2 kv heads, intermediate 1536: 50.9M params.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

RECIPE_VERSION = 1
VOCAB = 32000
HIDDEN_CHOICES = (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256)


def parse_params(text: str) -> int:
    """'0.5B' -> 500_000_000, '50M' -> 50_000_000, '1e8' -> 100_000_000."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], None)
    return int(float(t[:-1]) * mult) if mult else int(float(t))


def llama_config(params: int, vocab: int = VOCAB, hidden: int | None = None,
                 layers: int | None = None) -> dict:
    def shape(h: int) -> tuple[int, int, int, int]:
        heads = h // 64
        kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 3))
        inter = int(math.ceil(8 * h / 3 / 256) * 256)
        per_layer = 2 * h * h + 2 * h * (kv * 64) + 3 * h * inter + 2 * h
        return heads, kv, inter, per_layer

    min_layers = 12 if params >= 200_000_000 else 4
    if hidden is None:
        hidden = HIDDEN_CHOICES[-1]
        for h in HIDDEN_CHOICES:
            n = (params - 2 * vocab * h - h) / shape(h)[3]
            if n >= min_layers:
                hidden = h
                break
    heads, kv, inter, per_layer = shape(hidden)
    if layers is None:
        layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 64,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order transformers would save them (embed, layers, norm, head)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * 64, cfg["num_key_value_heads"] * 64
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def shard_plan(specs, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def _gen(seed: int, model: int, index: int) -> torch.Generator:
    # NOTE: one generator per (seed, model, tensor) so every tensor is reproducible on its
    # own, whatever the expert count or the order tensors are generated in.
    return torch.Generator().manual_seed(seed * 1_000_003 + model * 100_003 + index)


def base_tensor(name: str, shape, seed: int, index: int) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    t = torch.randn(shape, generator=_gen(seed, 0, index), dtype=torch.float32)
    return t.mul_(0.02).to(torch.bfloat16)


def expert_tensor(base: torch.Tensor, seed: int, expert: int, index: int,
                  noise: float) -> torch.Tensor:
    b = base.float()
    rms = b.square().mean().sqrt().item()
    t = torch.randn(b.shape, generator=_gen(seed, expert, index), dtype=torch.float32)
    t.mul_(noise * rms).add_(b)
    return t.to(torch.bfloat16)


def write_shard(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Stream one safetensors file: header first, then tensor bytes one at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in tensors:
            f.write(t.contiguous().view(torch.uint8).numpy().data)


def write_model(out: Path, cfg: dict, stamp: dict, shards, make) -> None:
    """Write one model dir atomically (tmp dir + rename); make(name, shape, index) -> bf16."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total, index = {}, 0, 0
    n = len(shards)
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = []
        for name, shape in shard:
            t = make(name, shape, index)
            index += 1
            tensors.append((name, t))
            weight_map[name] = fname
            total += t.numel() * 2
        write_shard(tmp / fname, tensors)
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    (tmp / ".workload.json").write_text(json.dumps(stamp, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def is_complete(d: Path, stamp: dict) -> bool:
    try:
        return json.loads((d / ".workload.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def make_workload(out: Path, params: int, experts: int, seed: int = 0, noise: float = 0.01,
                  shard_mb: int = 256, hidden: int | None = None, layers: int | None = None,
                  quiet: bool = False) -> dict:
    """Create (or reuse) OUT/base and OUT/expert_1..N; returns a summary dict."""
    cfg = llama_config(params, hidden=hidden, layers=layers)
    specs = tensor_specs(cfg)
    nparams = sum(math.prod(s) for _, s in specs)
    shards = shard_plan(specs, shard_mb * 1024 * 1024)
    out.mkdir(parents=True, exist_ok=True)
    common = {"recipe": RECIPE_VERSION, "config": cfg, "seed": seed, "shard_mb": shard_mb}

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    base_dir = out / "base"
    base_stamp = {**common, "role": "base"}
    if not is_complete(base_dir, base_stamp):
        t0 = time.perf_counter()
        write_model(base_dir, cfg, base_stamp, shards,
                    lambda name, shape, i: base_tensor(name, shape, seed, i))
        log(f"wrote {base_dir} in {time.perf_counter() - t0:.1f}s")

    # NOTE: experts read the base back through mmap instead of regenerating it.
    index_map = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    handles: dict[str, object] = {}

    def base_of(name: str) -> torch.Tensor:
        f = index_map[name]
        if f not in handles:
            handles[f] = safe_open(str(base_dir / f), framework="pt")
        return handles[f].get_tensor(name)

    for e in range(1, experts + 1):
        d = out / f"expert_{e}"
        stamp = {**common, "role": f"expert_{e}", "noise": noise}
        if is_complete(d, stamp):
            continue
        t0 = time.perf_counter()
        write_model(d, cfg, stamp, shards,
                    lambda name, shape, i, e=e: expert_tensor(base_of(name), seed, e, i, noise))
        log(f"wrote {d} in {time.perf_counter() - t0:.1f}s")
    handles.clear()
    return {"dir": str(out), "params": nparams, "config": cfg, "experts": experts,
            "shards": len(shards), "bytes_per_model": nparams * 2}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="0.5B", help="parameter target, e.g. 0.5B, 50M")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.01,
                    help="expert noise std relative to each tensor's RMS (default 0.01)")
    ap.add_argument("--shard-mb", type=int, default=256, help="max shard size in MiB")
    ap.add_argument("--hidden", type=int, default=None, help="override hidden size")
    ap.add_argument("--layers", type=int, default=None, help="override layer count")
    a = ap.parse_args(argv)
    info = make_workload(a.out, parse_params(a.params), a.experts, a.seed, a.noise,
                         a.shard_mb, a.hidden, a.layers)
    c = info["config"]
    print(f"{info['dir']}: {info['params'] / 1e6:.1f}M params "
          f"(hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
          f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, "
          f"intermediate {c['intermediate_size']}, vocab {c['vocab_size']}), "
          f"base + {info['experts']} experts, {info['shards']} shard(s) each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
