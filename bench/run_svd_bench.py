"""Benchmark the SVD-based FusionBench methods (TSV-M, Iso-C, Iso-CTS) against FusionBench 0.2.33.

    python bench/run_svd_bench.py [--hidden 384] [--layers 4] [--experts 3] [--threads 1]

The workload: a random Llama (hidden `hidden`, MLP 8/3·hidden, vocab 4096, `layers`
layers, float32) and `experts` fine-tuned copies (base + 0.02·N(0, 1) noise), written by
tests/conftest.py's `make_family`. Each method runs once per tool as a fresh process on
the same model directories:

- fusionlang: `fusionlang run` of a spec (`task_singular_vector(base, experts)` /
  `iso_c_merge(base, experts)` / `iso_cts_merge(base, experts)`), which writes the merged model;
- FusionBench: its `TaskSingularVectorMerging` / `IsotropicMergingInCommonSubspace` /
  `IsotropicMergingInCommonAndTaskSubspace` `.run` on a `BaseModelPool` (tests/reference/fusionbench_data_free.py), which loads
  the models with transformers and saves the merged state dict.

Both with OMP/MKL threads = `threads`. Recorded: wall time and peak anonymous RSS of the
process tree (bench/run_bench.py's `run_measured`), as ratios fusionlang / FusionBench,
and the largest relative difference between the two outputs. Results:
bench/results/svd_methods.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from run_bench import run_measured

# method: (fusionlang call, FusionBench parameters: its config defaults)
METHODS = {"tsvm": ("task_singular_vector(base, experts)", {"alpha": 1}),
           "iso_c": ("iso_c_merge(base, experts)", {"scaling_factor": 1.0}),
           "iso_cts": ("iso_cts_merge(base, experts)", {"scaling_factor": 1.0, "common_space_fraction": 0.8})}


def _max_rel_diff(a_path: Path, b_path: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    return max(float((a[k] - b[k]).abs().max()) / (1.0 + float(b[k].abs().max())) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "svd_methods")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    args = ap.parse_args()
    fb_python = Path(os.environ.get("FUSIONBENCH_PYTHON") or REPO / ".venv-fusionbench/bin/python")
    from conftest import make_family

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="svdbench") as tmp:
        root = Path(tmp)
        fam = make_family(root, "llama", n_experts=args.experts, hidden_size=args.hidden,
                          intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                          num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
                          vocab_size=4096)
        from safetensors.torch import load_file

        n_params = sum(v.numel() for v in load_file(str(fam["base"] / "model.safetensors")).values())
        experts = ", ".join(f'local("e{i}")' for i in range(args.experts))
        for method in args.methods.split(","):
            call, fb_params = METHODS[method]
            spec = root / f"{method}.fuse"
            spec.write_text(f'use merging\nmodel base = local("base")\nmodels experts = [{experts}]\n'
                            f'merge m = {call}\nsave m to "out_{method}"\n')
            ours = run_measured([str(REPO / ".venv/bin/fusionlang"), "run", str(spec), "-q"], env,
                                root / f"{method}_ours.log", args.timeout)
            cfg = root / f"{method}.json"
            cfg.write_text(json.dumps({"method": method, "base": str(fam["base"]),
                                       "models": [str(fam[f"e{i}"]) for i in range(args.experts)],
                                       "out": str(root / f"fb_{method}.safetensors"), "params": fb_params}))
            fb = run_measured([str(fb_python), str(REPO / "tests/reference/fusionbench_data_free.py"), str(cfg)], env,
                              root / f"{method}_fb.log", args.timeout)
            diff = (_max_rel_diff(root / f"out_{method}" / "model.safetensors", root / f"fb_{method}.safetensors")
                    if ours["rc"] == 0 and fb["rc"] == 0 else None)
            for who, res in (("fusionlang", ours), ("fb", fb)):
                if res["rc"] != 0:  # keep the reason: the temporary directory goes
                    res["log_tail"] = (root / f"{method}_{'ours' if who == 'fusionlang' else 'fb'}.log").read_text(
                        errors="replace")[-1500:]
            row = {"method": method, "fusionlang": ours, "fusionbench": fb, "max_rel_diff": diff,
                   "wall_ratio": round(ours["wall_s"] / fb["wall_s"], 3),
                   "peak_anon_ratio": round(ours["peak_anon_mb"] / max(fb["peak_anon_mb"], 1e-9), 3)}
            rows.append(row)
            print(f"{method:6s} fusionlang {ours['wall_s']:7.2f}s {ours['peak_anon_mb']:8.1f} MB | FusionBench "
                  f"{fb['wall_s']:7.2f}s {fb['peak_anon_mb']:8.1f} MB | ratio wall {row['wall_ratio']:.2f} "
                  f"mem {row['peak_anon_ratio']:.2f} | max rel diff {diff}", flush=True)
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
              "workload": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "experts": args.experts,
                           "params_per_model": n_params, "dtype": "float32", "threads": args.threads},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# SVD methods vs FusionBench 0.2.33 ({result['date']})", "",
             (f"Random Llama, {n_params / 1e6:.1f}M parameters per model (float32), {args.experts} experts, "
              f"{args.threads} thread(s). Whole process: start-up, read, merge, write."), "",
             ("| method | fusionlang s | FusionBench s | wall ratio | fusionlang MB | FusionBench MB | memory ratio "
              "| max rel diff |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['fusionlang']['wall_s']} | {r['fusionbench']['wall_s']} | {r['wall_ratio']} "
                     f"| {r['fusionlang']['peak_anon_mb']} | {r['fusionbench']['peak_anon_mb']} | "
                     f"{r['peak_anon_ratio']} | {r['max_rel_diff']:.2e} |" if r["max_rel_diff"] is not None else
                     f"| {r['method']} | {r['fusionlang']['wall_s']} | {r['fusionbench']['wall_s']} | "
                     f"{r['wall_ratio']} | {r['fusionlang']['peak_anon_mb']} | {r['fusionbench']['peak_anon_mb']} | "
                     f"{r['peak_anon_ratio']} | failed: " + ("fusionlang" if r["fusionlang"]["rc"] else "FusionBench")
                     + f" (exit code {r['fusionlang']['rc'] or r['fusionbench']['rc']}) |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
