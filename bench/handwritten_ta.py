"""The floor: a minimal hand-written streaming task-arithmetic merge.

    python bench/handwritten_ta.py --base B --experts E1 E2 ... --scale 0.3 --out OUT

out = bf16(base + scale * sum_i (expert_i - base)), computed per tensor in fp32,
exactly MergeKit's `task_arithmetic` with weight 1.0, lambda=scale, dtype float32,
out_dtype bfloat16 (same operation order, so the outputs are bit-identical).

Why it is fast and small, simply:
- inputs are mmap'ed and viewed as tensors with torch.frombuffer (no copy: the pages are
  file-backed page cache, not anonymous memory);
- big tensors are processed in row chunks (--chunk-mb of fp32 scratch), so the anonymous
  working set is a few chunk buffers regardless of tensor or model size;
- fp32 scratch buffers are allocated once and reused (in-place ops only);
- the output shards mirror the base model's shard layout, so each output file's header
  is known up front and the tensor bytes are streamed straight into the file.
The output directory is written to OUT.tmp and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class SafetensorsFile:
    """A memory-mapped safetensors file; tensors are zero-copy views of the mapping."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n = int.from_bytes(self.mm[:8], "little")
        self.header = json.loads(self.mm[8 : 8 + n])
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        shape = info["shape"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        import warnings

        with warnings.catch_warnings():
            # NOTE: the mapping is read-only; torch warns that frombuffer tensors are
            # writable views. We never write to them.
            warnings.simplefilter("ignore")
            t = torch.frombuffer(self.mm, dtype=dtype, count=(end - start) // dtype.itemsize,
                                 offset=self.data_start + start)
        return t.view(shape)


class Model:
    """A model directory: index.json -> files, or a single model.safetensors."""

    def __init__(self, d: Path):
        self.dir = d
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            self.weight_map = json.loads(idx.read_text())["weight_map"]
        else:
            f = SafetensorsFile(d / "model.safetensors")
            self.weight_map = {k: "model.safetensors" for k in f.header}
        self.files: dict[str, SafetensorsFile] = {}

    def file(self, fname: str) -> SafetensorsFile:
        if fname not in self.files:
            self.files[fname] = SafetensorsFile(self.dir / fname)
        return self.files[fname]

    def tensor(self, name: str) -> torch.Tensor:
        return self.file(self.weight_map[name]).tensor(name)


def merge(base_dir: Path, expert_dirs: list[Path], scale: float, out: Path,
          chunk_mb: int = 16) -> dict:
    base = Model(base_dir)
    experts = [Model(d) for d in expert_dirs]
    for e in experts:
        if set(e.weight_map) != set(base.weight_map):
            raise SystemExit(f"{e.dir}: tensor names differ from the base model")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    chunk_elems = max(1, chunk_mb * 1024 * 1024 // 4)
    acc = torch.empty(chunk_elems, dtype=torch.float32)
    tmp_buf = torch.empty(chunk_elems, dtype=torch.float32)
    b32 = torch.empty(chunk_elems, dtype=torch.float32)
    obuf = torch.empty(chunk_elems, dtype=torch.bfloat16)

    files = sorted(set(base.weight_map.values()))
    total = 0
    for fname in files:
        bf = base.file(fname)
        names = list(bf.header)  # file order
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            shape = bf.header[name]["shape"]
            n = 2
            for s in shape:
                n *= s
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp / fname, "wb") as fo:
            fo.write(len(raw).to_bytes(8, "little"))
            fo.write(raw)
            for name in names:
                b = bf.tensor(name).reshape(-1)
                xs = [e.tensor(name).reshape(-1) for e in experts]
                numel = b.numel()
                for s in range(0, numel, chunk_elems):
                    m = min(chunk_elems, numel - s)
                    a, t, bb, o = acc[:m], tmp_buf[:m], b32[:m], obuf[:m]
                    bb.copy_(b[s : s + m])
                    # (x_1 - b) + (x_2 - b) + ... in fp32, then * scale, then + b:
                    # the same order of operations as MergeKit's task_arithmetic.
                    a.copy_(xs[0][s : s + m]).sub_(bb)
                    for x in xs[1:]:
                        t.copy_(x[s : s + m]).sub_(bb)
                        a.add_(t)
                    a.mul_(scale).add_(bb)
                    o.copy_(a)
                    fo.write(o.view(torch.uint8).numpy().data)
                total += numel * 2
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": base.weight_map}, indent=2))
    for extra in ("config.json", "generation_config.json"):
        if (base_dir / extra).exists():
            shutil.copy(base_dir / extra, tmp / extra)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"bytes_written": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hand-written streaming task arithmetic")
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--experts", type=Path, nargs="+", required=True)
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--chunk-mb", type=int, default=16, help="fp32 scratch per buffer (MiB)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    info = merge(a.base, a.experts, a.scale, a.out, a.chunk_mb)
    print(f"wrote {a.out} ({info['bytes_written'] / 1e6:.0f} MB) in "
          f"{time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
