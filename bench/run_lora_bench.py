"""Benchmark LoRA extraction: fusionlang's `extract_lora()` against `mergekit-extract-lora`
0.1.5 on the same base and fine-tune.

    python bench/run_lora_bench.py [--params 0.5B] [--max-rank 32] [--threads 1]

The workload: bench/make_workload.py's Llama base and first expert (bf16; 0.5B: hidden
1536, 16 layers, 501M parameters). Each tool runs once as a fresh process: mergekit
(`.venv-mergekit`, `--max-rank R`, its defaults otherwise) and `fusionlang run` of
`merge a = extract_lora(base, ft, max_rank=R)`, both with OMP/MKL threads = `threads`.
Recorded: wall time and peak anonymous RSS of the process tree (bench/run_bench.py's
`run_measured`) as ratios fusionlang / mergekit, and the largest difference of the two
adapters' B·A products and full-rank tensors (a factor's sign is SVD's choice).
Results: bench/results/extract_lora.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from make_workload import make_workload, parse_params
from run_bench import run_measured


def compare(a: Path, b: Path) -> tuple[bool, float]:
    """(same tensor names, largest |difference| of B·A products and full tensors)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if set(x) != set(y):
        return False, float("inf")
    worst = 0.0
    for k in x:
        if ".lora_B." in k or k.endswith("lora_embedding_B"):
            continue
        if ".lora_A." in k or k.endswith("lora_embedding_A"):
            kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            d = (x[kb].double() @ x[k].double()) - (y[kb].double() @ y[k].double())
        else:
            d = x[k].double() - y[k].double()
        worst = max(worst, float(d.abs().max()))
    return True, worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="0.5B")
    ap.add_argument("--max-rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    mk = REPO / ".venv-mergekit/bin/mergekit-extract-lora"
    if not mk.is_file():
        print("mergekit is not installed: bash .ci/install_mergekit.sh", file=sys.stderr)
        return 1
    wl = (a.workdir / f"workload-{a.params}-seed0").resolve()
    info = make_workload(wl, parse_params(a.params), 1, seed=0)
    runs = (a.workdir / "runs-lora").resolve()
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    threads = str(a.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    (runs / "x.fuse").write_text(f'model base = local("{wl / "base"}")\nmodel ft = local("{wl / "expert_1"}")\n'
                                 f'merge a = extract_lora(base, ft, max_rank={a.max_rank})\nsave a to "{runs / "fl"}"\n')
    fl = run_measured([str(REPO / ".venv/bin/fusionlang"), "run", str(runs / "x.fuse"), "-q"], env,
                      runs / "fl.log", 3600)
    mkr = run_measured([str(mk), "--model", str(wl / "expert_1"), "--base-model", str(wl / "base"), "--out-path",
                        str(runs / "mk"), "--max-rank", str(a.max_rank)], env, runs / "mk.log", 3600)
    ok = fl["rc"] == 0 and mkr["rc"] == 0
    same, worst = compare(runs / "fl", runs / "mk") if ok else (False, float("nan"))
    rec = {"fusionlang": fl, "mergekit": mkr, "same_tensor_names": same, "max_abs_diff_BA": worst,
           "time_ratio": round(fl["wall_s"] / mkr["wall_s"], 3) if ok else None,
           "mem_ratio": round(fl["peak_anon_mb"] / mkr["peak_anon_mb"], 3) if ok else None}
    cfg = info["config"]
    meta = {"date": _dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": a.threads, "params": info["params"], "max_rank": a.max_rank,
            "command": "python bench/run_lora_bench.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract_lora.json").write_text(json.dumps({"meta": meta, "result": rec}, indent=1) + "\n")
    lines = [f"# LoRA extraction: fusionlang vs mergekit-extract-lora 0.1.5 ({meta['date']}, {meta['cpus']} CPUs)", "",
             (f"`{meta['command']}`: a Llama base and one fine-tune of {info['params'] / 1e6:.0f}M parameters (hidden "
             f"{cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, bf16), max_rank {a.max_rank}, "
             f"{a.threads} thread(s) each. Wall time of the whole process and peak anonymous RSS of the process "
             "tree; ratios < 1 favour fusionlang."), "",
             ("| fusionlang s | mergekit s | time ratio | fusionlang MB | mergekit MB | memory ratio | same tensors: "
             "max diff of B·A |"), "|---:|---:|---:|---:|---:|---:|---|",
             (f"| {fl['wall_s']:.1f} | {mkr['wall_s']:.1f} | {rec['time_ratio']} | {fl['peak_anon_mb']:.0f} | "
             f"{mkr['peak_anon_mb']:.0f} | {rec['mem_ratio']} | {same}: {worst:.3g} |")]
    if not ok:
        lines += ["", "A tool failed: see the logs under " + str(runs)]
    (out / "extract_lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(runs / "fl", ignore_errors=True)
    shutil.rmtree(runs / "mk", ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
