"""Task arithmetic and TIES with `--device cuda` against `--device cpu` (issue 13, GPU).

    python3 bench/run_gpu_bench.py --out DIR [--params 0.5B] [--experts 4] [--repeat 2]

Prepared for a GPU machine lent through the `device` tool (run it from bench/gpu_check.sh).
Builds bench/make_workload.py's Llama family (bf16) under --work, then, for each method and
device, runs the merge in-process with `fusionlang.run` (after one warm-up run per device,
so CUDA's start-up is not counted) and records:

- wall time of the merge (RunResult.seconds: read, compute, write) and the bytes read and
  written; the merge's effective bandwidth (read + written) / seconds;
- the same bytes' share of the device's memory bandwidth (`--peak-tbs`, 4.8 TB/s for an
  H200's HBM3e), which is the issue's "fraction of device memory bandwidth" for an
  end-to-end run (bounded by the host reads: the inputs come from files);
- whether the cuda output equals the cpu output (max abs difference over all tensors).

Writes DIR/gpu_bench.json and DIR/gpu_bench.md. MergeKit `--cuda` is not run here (its
package and dependencies would have to travel as wheels: bench/gpu_wheels.sh lists them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_workload import make_workload, parse_params

METHODS = {"task_arithmetic": "task_arithmetic(base, experts, scale=0.3)", "ties": "ties(base, experts, density=0.2)"}


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for fa in sorted(a.glob("*.safetensors")):
        ta, tb = load_file(str(fa)), load_file(str(b / fa.name))
        worst = max([worst] + [float((ta[k].float() - tb[k].float()).abs().max()) for k in ta])
    return worst


def main() -> int:
    import torch

    import fusionlang

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusionlang-gpu-bench"))
    ap.add_argument("--params", default="0.5B")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--peak-tbs", type=float, default=4.8)
    ap.add_argument("--devices", default="cuda,cpu", help="two devices to compare (cpu,cpu checks the script itself)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    wl = a.work / f"workload-{a.params}"
    t0 = time.perf_counter()
    info = make_workload(wl, parse_params(a.params), a.experts, seed=0, quiet=True)
    print(f"workload: {info['params'] / 1e6:.0f}M parameters x {a.experts + 1} in {time.perf_counter() - t0:.0f}s",
          flush=True)
    experts = ", ".join(f'local("{wl}/expert_{e}")' for e in range(1, a.experts + 1))
    rows = []
    for method, call in METHODS.items():
        outs = []
        for n, device in enumerate(a.devices.split(",")[:2]):
            spec = a.work / f"{method}_{n}_{device}.fuse"
            out = a.work / f"out_{method}_{n}_{device}"
            spec.write_text(f'use merging\nmodel base = local("{wl}/base")\nmodels experts = [{experts}]\n'
                            f'merge m = {call}\nsave m to "{out}"\n')
            best = None
            for i in range(a.repeat + 1):  # the first: warm-up (CUDA context, page cache)
                res = fusionlang.run(str(spec), device=device, progress=False)
                if i and (best is None or res.seconds < best.seconds):
                    best = res
            outs.append(out)
            moved = best.bytes_read + best.bytes_written
            row = {"method": method, "device": device, "seconds": round(best.seconds, 3),
                   "bytes_read": best.bytes_read, "bytes_written": best.bytes_written,
                   "gb_per_s": round(moved / best.seconds / 1e9, 2),
                   "share_of_peak": round(moved / best.seconds / (a.peak_tbs * 1e12), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        diff = _max_diff(outs[0], outs[1])
        rows.append({"method": method, "devices": a.devices, "max_abs_diff": diff})
        print(f"{method}: {a.devices} max abs diff {diff:.3g}", flush=True)
    meta = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "params": info["params"],
            "experts": a.experts, "repeat": a.repeat, "peak_tbs": a.peak_tbs}
    (a.out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# GPU: fusionlang --device cuda vs cpu ({meta['gpu']}, torch {meta['torch']})", "",
             (f"{info['params'] / 1e6:.0f}M-parameter Llama (bf16), {a.experts} experts; best of {a.repeat} "
              "after a warm-up; seconds = the merge (read, compute, write)."), "",
             "| method | device | s | GB/s (read + written) | share of HBM peak |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['device']} | {r['seconds']} | {r['gb_per_s']} | {r['share_of_peak']} |"
              for r in rows if "device" in r]
    lines += [""] + [f"- {r['method']}: {r['devices']}, max abs difference of the outputs {r['max_abs_diff']:.3g}"
                     for r in rows if "max_abs_diff" in r]
    (a.out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
