"""What merging a Llama-3-70B family costs on a cluster, on paper: `compile --estimate-cluster`.

    python bench/cluster_estimate.py [--experts 8] [--workers 1,4,8,16] [--disk-gbps 2]
        [--net-gbps 1.25] [--mem-gbps 10] [--slots 1,8] [--tmp DIR] > table.md

Builds, without any real weights, a base and `--experts` fine-tunes shaped like
Llama-3-70B (transformers' LlamaConfig: hidden 8192, intermediate 28672, 80 layers, 64
heads, 8 key/value heads, vocab 128256, untied head; bf16, 70.6B parameters, 141 GB per
model): Hugging Face checkpoint directories (config.json, model-0000k-of-0000n.safetensors
shards of at most 5 GB, model.safetensors.index.json) whose safetensors headers are real
and whose data sections are holes of a sparse file (the header is written with the
correct offsets, then the file is truncated to its full size: 1.3 TB of models take a few
MB of disk). It writes one spec per method (task arithmetic; TIES at density 0.2 per
tensor, MergeKit's; TIES with FusionBench's model-wide top-k, three phases), compiles
each once through `fusionlang.compile`, and prints a markdown table of
`plan.cluster.estimate_cluster` for each worker count; then runs the command line,
`fusionlang compile SPEC --estimate-cluster N`, for every N and checks that it prints
the same expected time.

It checks that compiling reads only the headers: after every compile (the API's and the
command line's) no page of tensor data may be in the page cache (mincore(2); reading a
hole of a sparse file puts zero-filled pages in the cache like any other read), past
each shard's header and the kernel's readahead window after it. The temporary
directory, sparse files included, is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default max_shard_size ("5GB")
DTYPE = "BF16"

METHODS = {  # name in the table -> merge expression over `base` and `experts`
    "task arithmetic (scale 0.3)": "task_arithmetic(base, experts, scale=0.3)",
    "TIES (density 0.2, per tensor)": "ties(base, experts, density=0.2)",
    "TIES (density 0.2, model-wide top-k)": 'ties(base, experts, density=0.2, scope="model")',
}


def llama3_70b_config():
    """transformers' LlamaConfig with Llama-3-70B's shapes (bf16, untied head)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                       torch_dtype="bfloat16")


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of LlamaForCausalLM(config), built on the meta device (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_sparse_checkpoint(path: Path, config, shapes: dict[str, tuple[int, ...]]) -> int:
    """A Hugging Face checkpoint directory at `path` of bf16 tensors `shapes`, in shards of
    at most SHARD_BYTES (in state-dict order, as save_pretrained fills them), each a
    safetensors file whose header is real and whose data is a hole. Returns the model's
    tensor bytes."""
    path.mkdir(parents=True)
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = 2 * _numel(shape)
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    weight_map, total = {}, 0
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            size = 2 * _numel(shapes[name])
            header[name] = {"dtype": DTYPE, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = fname
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            f.truncate(8 + len(text) + offset)  # the data: a hole, no blocks on disk
        total += offset
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(path)
    return total


def readahead_bytes(path: Path) -> int:
    """The kernel's readahead window for the disk holding `path` (sysfs; 8 MiB if unknown)."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for q in (dev / "queue" / "read_ahead_kb", dev / ".." / "queue" / "read_ahead_kb"):
        try:
            return int(q.read_text()) * 1024
        except (OSError, ValueError):
            continue
    return 8 << 20


def resident_pages(path: Path) -> list[int]:
    """Offsets of the pages of `path` in the page cache: mincore(2) on a mapping of the
    file, through ctypes (mapping touches no page)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    page, size = mmap.PAGESIZE, path.stat().st_size
    vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap({path})")
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore({path})")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return [i * page for i, v in enumerate(vec) if v & 1]


def data_read(files: list[Path]) -> int:
    """Bytes of tensor data of `files` in the page cache, past the header and the
    kernel's readahead window after it (reading a header again after the kernel dropped
    it from the cache pulls in that window: zero pages of the hole, not a read of fusionlang's)."""
    total = 0
    for f in files:
        with open(f, "rb") as h:
            data_start = 8 + struct.unpack("<Q", h.read(8))[0]
        past = data_start + readahead_bytes(f)
        total += mmap.PAGESIZE * sum(1 for off in resident_pages(f) if off >= past)
    return total


def spec_text(n_experts: int, merge: str) -> str:
    experts = ", ".join(f'local("expert_{i}")' for i in range(1, n_experts + 1))
    return (f'use merging\n\nmodel base = local("base")\nmodels experts = [{experts}]\n\n'
            f"merge merged = {merge}\n\nsave merged to \"out/merged\" as bf16\n")


def main() -> int:
    from fusionlang.plan import cluster

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--workers", default="1,4,8,16", help="comma-separated worker counts")
    ap.add_argument("--disk-gbps", type=float, default=cluster.DEFAULT_DISK_GBPS)
    ap.add_argument("--net-gbps", type=float, default=cluster.DEFAULT_NET_GBPS)
    ap.add_argument("--mem-gbps", type=float, default=cluster.DEFAULT_MEM_GBPS)
    ap.add_argument("--storage-gbps", type=float, default=None)
    ap.add_argument("--slots", default="1,8", help="comma-separated units per worker at once: a table each "
                    "(the command line runs with the last)")
    ap.add_argument("--methods", default=",".join(str(i) for i in range(len(METHODS))),
                    help="indices into the method list (default: all)")
    ap.add_argument("--tmp", default=None, help="where the sparse models go (default: the system's temp dir)")
    ap.add_argument("--skip-cli", action="store_true", help="do not run `fusionlang compile` for each N")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    slots_list = [int(k) for k in args.slots.split(",")]
    methods = [list(METHODS.items())[int(i)] for i in args.methods.split(",")]

    import fusionlang
    from fusionlang.plan.cluster import estimate_cluster, human_duration

    root = Path(tempfile.mkdtemp(prefix="fusionlang-70b-", dir=args.tmp))
    try:
        config = llama3_70b_config()
        shapes = tensor_shapes(config)
        t0 = time.perf_counter()
        names = ["base"] + [f"expert_{i}" for i in range(1, args.experts + 1)]
        model_bytes = 0
        for name in names:
            model_bytes = write_sparse_checkpoint(root / name, config, shapes)
        files = sorted(root.glob("*/*.safetensors"))
        if data_read(files):
            raise SystemExit("tensor data pages are cached before anything read them: the check cannot work here")
        on_disk = sum(f.stat().st_blocks * 512 for f in files)
        print(f"# {len(names)} Llama-3-70B-shaped checkpoints: {sum(_numel(s) for s in shapes.values()) / 1e9:.2f}B "
              f"parameters, {model_bytes / 1e9:.1f} GB each in {len(files) // len(names)} shards, "
              f"{model_bytes * len(names) / 1e12:.2f} TB in all, {on_disk / 1e6:.1f} MB on disk "
              f"(written in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        rows = []
        cli_out = []
        for label, merge in methods:
            spec = root / f"{re.sub(r'[^a-z]+', '_', label.lower()).strip('_')}.fuse"
            spec.write_text(spec_text(args.experts, merge))
            t0 = time.perf_counter()
            plan = fusionlang.compile(str(spec))
            compile_s = time.perf_counter() - t0
            read = data_read(files)
            if read:
                raise SystemExit(f"compiling {spec.name} read tensor data: {read} bytes of it are in the page cache "
                                 "(compile must read headers only)")
            print(f"# {label}: compiled in {compile_s:.1f} s, {len(plan.nodes)} plan nodes; no tensor data in the "
                  "page cache (headers only)", file=sys.stderr)
            for slots in slots_list:
                for n in workers:
                    est = estimate_cluster(plan, n, args.disk_gbps, args.net_gbps, args.mem_gbps, args.storage_gbps,
                                           slots)
                    rows.append((label, est))
            for n in [] if args.skip_cli else workers:
                est = estimate_cluster(plan, n, args.disk_gbps, args.net_gbps, args.mem_gbps, args.storage_gbps,
                                       slots_list[-1])
                cmd = [_fusionlang(), "compile", str(spec), "-q", "--estimate-cluster", str(n),
                       "--disk-gbps", str(args.disk_gbps), "--net-gbps", str(args.net_gbps),
                       "--mem-gbps", str(args.mem_gbps), "--slots", str(slots_list[-1])]
                if args.storage_gbps:
                    cmd += ["--storage-gbps", str(args.storage_gbps)]
                t0 = time.perf_counter()
                p = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
                printed = re.search(r"expected time on (?:\d+ workers|one machine): (.*?) —", p.stderr)
                if not printed or printed[1] != human_duration(est.seconds):
                    raise SystemExit(f"the command line printed {printed and printed[1]!r}, the API "
                                     f"{human_duration(est.seconds)!r}:\n{p.stderr}")
                cli_out.append(f"$ fusionlang compile {spec.name} -q --estimate-cluster {n} --slots {slots_list[-1]}"
                               f"  ({time.perf_counter() - t0:.1f} s)\n{p.stderr}")
        read = data_read(files)
        if read:
            raise SystemExit(f"`fusionlang compile` read tensor data: {read} bytes of it are in the page cache")
        for text in cli_out:
            print(text, file=sys.stderr)
        print(markdown(rows, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def markdown(rows, args) -> str:
    """One markdown table per slot count: a row per (method, workers)."""
    from fusionlang.plan.cluster import human_bytes, human_duration

    storage = f"shared storage {args.storage_gbps:g} GB/s in all" if args.storage_gbps else "shared storage unlimited"
    out = [(f"Bandwidths: disk {args.disk_gbps:g} GB/s per machine, network {args.net_gbps:g} GB/s (the driver's), "
            f"fp32 compute {args.mem_gbps:g} GB/s per CPU, {storage}; 1 GB = 10^9 bytes.")]
    for slots in sorted({est.slots for _, est in rows}):
        out += ["", f"{slots} unit{'s' * (slots != 1)} at a time per machine (CPUs per worker):", "",
                ("| merge | workers | expected time | bottleneck | reads per worker (max) | sends per worker (max) "
                 "| driver receives | driver writes | memory per worker (max) | vs one machine |"),
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for label, est in rows:
            if est.slots != slots:
                continue
            ws = est.per_worker
            cluster = est.workers > 1
            out.append(
                f"| {label} | {est.workers} | {human_duration(est.seconds)} | {est.bottleneck} "
                f"| {human_bytes(max(w.read_bytes for w in ws))} "
                f"| {human_bytes(max(w.sent_bytes for w in ws)) if cluster else '—'} "
                f"| {human_bytes(est.sent_bytes) if cluster else '—'} "
                f"| {human_bytes(est.output_bytes)} | {human_bytes(est.peak_bytes)} "
                f"| {est.one_machine.seconds / est.seconds:.1f}× |")
    return "\n".join(out)


def _fusionlang() -> str:
    exe = Path(sys.executable).parent / "fusionlang"
    return str(exe) if exe.exists() else "fusionlang"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
