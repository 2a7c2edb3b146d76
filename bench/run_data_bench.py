"""Benchmark the data-dependent methods against FusionBench on the text zoo's models.

    python bench/run_data_bench.py [--experts 4] [--rows 256] [--steps 20]

The workload: the text zoo's fine-tuned encoders (all-MiniLM-L6-v2, 22.7M parameters,
`fusionlang zoo build text`) as `BertForSequenceClassification` models (encoder weights
from the zoo, a pooler and a 2-class head drawn from a fixed seed), with their tokenizer,
and `rows` training texts of each expert's task as JSON lines. Each method runs once in
each tool, as a fresh process, on the same models, rows and batches:

- RegMean (batch 32, alpha 0.95), Fisher merging (batch 32), task-wise AdaMerging
  (`steps` steps, batch 16, lr 1e-3). fusionlang's defaults leave padded positions out of
  the Gram matrices and batch rows of similar length; `regmean_padded`
  (include_padding=true) and `fisher_given` (batch_order="given") are FusionBench's own
  computation, each against the same FusionBench run as its default.
- fusionlang: `fusionlang run` of a spec (a fresh, empty stage cache each time), which
  also writes the merged model.
- FusionBench 0.2.33 (.ci/install_fusionbench.sh): its `regmean_merging`,
  `fisher_merging` and TaskWise/LayerWiseMergedModel loop
  (tests/reference/fusionbench_data_methods.py), which also saves the merged tensors.

Recorded: wall time and peak anonymous RSS of the process tree (bench/run_bench.py's
`run_measured`), as ratios fusionlang / FusionBench. Results: bench/results/data_methods.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from run_bench import run_measured

TASKS = ("austen", "pos", "spam", "finefoods")


def make_workload(root: Path, n_experts: int, rows: int) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    from fusionlang.zoo.evaluate import find_task, load_task_data
    from fusionlang.zoo.paths import zoo_dir

    zdir = zoo_dir("text")
    base_dir = zdir / "base"
    config = BertConfig.from_pretrained(str(base_dir))
    config.num_labels = 2
    config.architectures = ["BertForSequenceClassification"]
    out = {"models": [], "data": []}
    for k, task in enumerate(TASKS[:n_experts]):
        torch.manual_seed(k)
        m = BertForSequenceClassification(config).eval()
        enc = {}
        for f in sorted((zdir / task).glob("*.safetensors")):
            enc.update(load_file(str(f)))
        missing, _ = m.bert.load_state_dict(enc, strict=False)
        assert all("pooler" in x or "position_ids" in x for x in missing), missing
        d = root / f"m_{task}"
        m.save_pretrained(d)
        for f in base_dir.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
                shutil.copy(f, d / f.name)
        out["models"].append(str(d))
        texts = load_task_data(find_task(task, "text")).split("train").texts[:rows]
        p = root / f"{task}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        out["data"].append(str(p))
    out["base"] = out["models"][0]
    return out


def fuse_spec(root: Path, w: dict, method: str, rows: int, steps: int) -> Path:
    names = [f"local({json.dumps(m)})" for m in w["models"]]
    datas = [f'dataset({json.dumps(d)}, text="text", n={rows})' for d in w["data"]]
    merge = {"regmean": "regmean(experts, calib, alpha=0.95, batch_size=32)",
             "regmean_padded": "regmean(experts, calib, alpha=0.95, batch_size=32, include_padding=true)",
             "fisher": "fisher_merging(experts, calib, batch_size=32)",
             "fisher_given": 'fisher_merging(experts, calib, batch_size=32, batch_order="given")',
             "adamerging": f"adamerging(base, experts, calib, steps={steps}, lr=0.001, batch_size=16)"}[method]
    spec = root / f"{method}.fuse"
    spec.write_text(f"use merging\nmodel base = local({json.dumps(w['base'])})\nmodels experts = [{', '.join(names)}]\n"
                    f"let calib = [{', '.join(datas)}]\nmerge out = {merge}\nsave out to \"fl_{method}\"\n")
    return spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default="regmean,regmean_padded,fisher,fisher_given,adamerging")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of each tool (each fresh)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    fb_python = REPO / ".venv-fusionbench/bin/python"
    if not fb_python.is_file():
        print("FusionBench is not installed: bash .ci/install_fusionbench.sh", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="fl-databench-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(os.cpu_count())}
    try:
        w = make_workload(root, args.experts, args.rows)
        results = []
        for method in args.methods.split(","):
            spec = fuse_spec(root, w, method, args.rows, args.steps)
            fls = []
            for k in range(args.repeat):  # each run with a new, empty stage cache
                cache = root / f"cache_{method}_{k}"
                fls.append(run_measured([str(REPO / ".venv/bin/fusionlang"), "run", str(spec), "-q"],
                                        {**env, "FUSIONLANG_CACHE": str(cache)}, root / f"fl_{method}.log", 3600))
            fl = min(fls, key=lambda r: (r["rc"] != 0, r["wall_s"]))
            cfg = {"method": method.split("_")[0], "models": w["models"],
                   "data": w["data"], "n": args.rows, "batch_size": 16 if method == "adamerging" else 32,
                   "alpha": 0.95, "out": str(root / f"fb_{method}.safetensors"), "base": w["base"], "mode": "task",
                   "steps": args.steps, "lr": 0.001, "init": 0.3, "seed": 0}
            (root / f"{method}.json").write_text(json.dumps(cfg))
            fbs = [run_measured([str(fb_python), str(REPO / "tests/reference/fusionbench_data_methods.py"),
                                 str(root / f"{method}.json")], env, root / f"fb_{method}.log", 3600)
                   for _ in range(args.repeat)]
            fb = min(fbs, key=lambda r: (r["rc"] != 0, r["wall_s"]))
            rec = {"method": method, "fusionlang": fl, "fusionbench": fb,
                   "time_ratio": round(fl["wall_s"] / fb["wall_s"], 3) if fl["rc"] == 0 and fb["rc"] == 0 else None,
                   "mem_ratio": round(fl["peak_anon_mb"] / fb["peak_anon_mb"], 3) if fl["rc"] == 0 and fb["rc"] == 0
                   else None}
            for tool, r in (("fusionlang", fl), ("fusionbench", fb)):
                if r["rc"] != 0:
                    log = root / f"{'fl' if tool == 'fusionlang' else 'fb'}_{method}.log"
                    rec[f"{tool}_error"] = log.read_text()[-2000:]
            results.append(rec)
            print(f"{method:11s} fusionlang {fl['wall_s']:7.1f}s {fl['peak_anon_mb']:7.0f} MB | FusionBench "
                  f"{fb['wall_s']:7.1f}s {fb['peak_anon_mb']:7.0f} MB | ratios time {rec['time_ratio']} "
                  f"mem {rec['mem_ratio']}", flush=True)
        meta = {"date": _dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "experts": args.experts, "rows": args.rows, "steps": args.steps,
                "repeat": args.repeat,
                "command": "python bench/run_data_bench.py " + " ".join(sys.argv[1:])}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_methods.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        intro = (f"`{meta['command']}`: {args.experts} text-zoo experts (MiniLM, 22.7M parameters) as "
                 f"BertForSequenceClassification, {args.rows} rows each; AdaMerging {args.steps} steps. Wall time of "
                 "the whole process (start-up, model loading, statistics, merge, write) and peak anonymous RSS of "
                 f"the process tree, best of {args.repeat} fresh run(s) of each tool. Ratios < 1 favour fusionlang.")
        lines = [f"# Data-dependent methods: fusionlang vs FusionBench ({meta['date']}, {meta['cpus']} CPUs)", "", intro, "",
                 "| method | fusionlang s | FusionBench s | time ratio | fusionlang MB | FusionBench MB | memory ratio |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            fl, fb = r["fusionlang"], r["fusionbench"]
            lines.append(f"| {r['method']} | {fl['wall_s']:.1f} | {fb['wall_s']:.1f} | {r['time_ratio']} | "
                         f"{fl['peak_anon_mb']:.0f} | {fb['peak_anon_mb']:.0f} | {r['mem_ratio']} |")
        (out / "data_methods.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
