"""Benchmark fusionlang against MergeKit and a hand-written streaming loop.

    python bench/run_bench.py --params 0.5B --experts 2,4,8

For each expert count and method (task_arithmetic, ties, dare_ties) this writes the
fusionlang spec and the MergeKit YAML for the same merge, runs each tool as a subprocess
on the same workload (bench/make_workload.py), and records wall time and the peak
*anonymous* RSS of the whole process tree. It also runs the hand-written streaming
task-arithmetic loop (bench/handwritten_ta.py, the floor) and one fusionlang spec with all
three merges ("3-in-1"). A tool that is missing or fails is recorded as such; the other
runs go on. Results: RESULTS_DIR/results.json and RESULTS_DIR/results.md (also printed).
See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from handwritten_ta import Model  # noqa: E402  (after the sys.path insert)
from make_workload import make_workload, parse_params  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_ties")
TA_SCALE = 0.3
TIES_DENSITY = 0.2
DARE_DENSITY = 0.5
SEED = 0


# ----------------------------------------------------------------------------- specs

def fusionlang_spec(base: Path, experts: list[Path], merges: list[tuple[str, str, Path]]) -> str:
    """merges: (variable, method, output dir); "task_arithmetic@0.5" sets the scale."""
    calls = {
        "task_arithmetic": f"task_arithmetic(base, experts, scale={TA_SCALE})",
        "ties": f"ties(base, experts, density={TIES_DENSITY})",
        "dare_ties": f"dare(base, experts, density={DARE_DENSITY}, consensus=true, rescale=\"l1\", seed={SEED})",
    }
    lines = ["use merging", "", f'model base = local("{base}")',
             "models experts = [" + ", ".join(f'local("{e}")' for e in experts) + "]", ""]
    for var, method, _ in merges:
        name, _, scale = method.partition("@")
        lines.append(f"merge {var} = " + (f"task_arithmetic(base, experts, scale={scale})" if scale
                                           else calls[name]))
    lines.append("")
    lines += [f'save {var} to "{out}" as bf16' for var, _, out in merges]
    return "\n".join(lines) + "\n"


def mergekit_yaml(base: Path, experts: list[Path], method: str, dtype: str) -> str:
    """The MergeKit config whose output matches fusionlang's (see docs/mergekit-semantics.md)."""
    params = {"task_arithmetic": "{weight: 1.0}",
              "ties": f"{{weight: 1.0, density: {TIES_DENSITY}}}",
              "dare_ties": f"{{weight: 1.0, density: {DARE_DENSITY}}}"}[method]
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    lines += [f"  - model: {e}\n    parameters: {params}" for e in experts]
    if method == "task_arithmetic":
        lines.append(f"parameters: {{lambda: {TA_SCALE}}}")
    # ties: normalize defaults to true (mean over agreeing signs) = fusionlang merge="mean".
    # dare_ties: rescale defaults to true (L1-norm restoration), normalize to false.
    lines += [f"dtype: {dtype}", "out_dtype: bfloat16"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- measurement

def _read_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    """root and all its descendants, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # NOTE: the command name (field 2) may contain spaces/parens; split after the last ')'.
        rest = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(rest[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float,
                 mem_limit_mb: float | None = None, interval: float = 0.01) -> dict:
    """Run cmd; return wall time, peak anonymous RSS of its process tree, exit code.

    The tree is killed when it runs past `timeout` seconds or past `mem_limit_mb` of
    anonymous memory (so a runaway merge cannot take the shared machine down with it).
    """
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        # NOTE: own session, so the whole tree can be killed with one killpg.
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        pids, next_scan, peak_kb, samples = [proc.pid], 0.0, 0, 0
        status, rusage, killed = None, None, None
        while True:
            wpid, wstatus, wrusage = os.wait4(proc.pid, os.WNOHANG)
            if wpid:
                status, rusage = wstatus, wrusage
                break
            now = time.perf_counter()
            if now >= next_scan:  # the tree changes rarely; rescan it every 0.25 s
                pids = _descendants(proc.pid)
                next_scan = now + 0.25
            total = sum(_read_anon_kb(p) for p in pids)
            peak_kb = max(peak_kb, total)
            samples += 1
            if now - t0 > timeout:
                killed = f"killed: ran past the {timeout:.0f}s timeout"
            elif mem_limit_mb and total > mem_limit_mb * 1024:
                killed = f"killed: anonymous memory passed the {mem_limit_mb:.0f} MB limit"
            if killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(interval)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": round(wall, 3),
        "peak_anon_mb": round(peak_kb / 1024, 1),
        # ru_maxrss: largest RSS (anonymous + file-backed pages) of any one process.
        "max_rss_mb": round(rusage.ru_maxrss / 1024, 1) if rusage else None,
        "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 2) if rusage else None,
        "rc": proc.returncode,
        "killed": killed,
        "samples": samples,
    }


def warm_cache(dirs: list[Path]) -> float:
    """Read every input file once so all tools start from a warm page cache."""
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
    return time.perf_counter() - t0


def compare_outputs(a: Path, b: Path) -> dict:
    """Max |a-b| and fraction of differing elements over all tensors (bf16 compared as fp32)."""
    try:
        ma, mb = Model(a), Model(b)
    except (OSError, ValueError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if set(ma.weight_map) != set(mb.weight_map):
        return {"error": "tensor names differ",
                "only_a": sorted(set(ma.weight_map) - set(mb.weight_map))[:5],
                "only_b": sorted(set(mb.weight_map) - set(ma.weight_map))[:5]}
    worst, ndiff, n = 0.0, 0, 0
    for name in ma.weight_map:
        x, y = ma.tensor(name), mb.tensor(name)
        if x.shape != y.shape:
            return {"error": f"shape differs for {name}: {tuple(x.shape)} vs {tuple(y.shape)}"}
        d = (x.float() - y.float()).abs_()
        worst = max(worst, float(d.max())) if d.numel() else worst
        ndiff += int((d > 0).sum())
        n += d.numel()
    return {"max_abs_diff": worst, "frac_diff": ndiff / max(n, 1)}


# --------------------------------------------------------------------------- runners

def find_fusionlang(arg: str | None) -> list[str] | None:
    if arg:
        return shlex.split(arg)
    exe = shutil.which("fusionlang")
    if exe:
        return [exe]
    venv = REPO / ".venv" / "bin" / "fusionlang"
    return [str(venv)] if venv.exists() else None


def find_mergekit(arg: str | None) -> list[str] | None:
    if arg:
        return shlex.split(arg)
    venv = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
    if venv.exists():
        return [str(venv)]
    exe = shutil.which("mergekit-yaml")
    return [exe] if exe else None


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def version_of(cmd: list[str], code: str) -> str | None:
    py = Path(cmd[0]).with_name("python")
    if not py.exists():
        return None
    try:
        return subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                              timeout=120, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    cpu, mem = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024**2:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem,
            "platform": platform.platform(), "python": platform.python_version()}


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="0.5B")
    ap.add_argument("--experts", default="2,4,8", help="comma-separated expert counts")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results")
    ap.add_argument("--fusionlang", default=None, help="command for fusionlang (default: on PATH)")
    ap.add_argument("--mergekit", default=None,
                    help="mergekit-yaml command (default: .venv-mergekit/bin/mergekit-yaml)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-fusionlang", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--skip-multi", action="store_true", help="skip the 3-in-1 fusionlang spec")
    ap.add_argument("--mergekit-dtype", default="float32",
                    help="MergeKit `dtype:` (computation dtype); float32 matches fusionlang")
    ap.add_argument("--mergekit-shard-size", default=None,
                    help="--out-shard-size for MergeKit (default: its own, 5B bytes)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS/MKL_NUM_THREADS for every tool (default 1; "
                    "0 = leave each tool's default). See README: OpenMP barriers collapse "
                    "when the 2 cores are shared with other work")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest is kept")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--mem-limit-mb", type=float, default=12000,
                    help="kill a run whose anonymous memory passes this (0 = no limit)")
    ap.add_argument("--no-verify", action="store_true", help="skip comparing outputs")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    a = ap.parse_args(argv)

    counts = [int(x) for x in a.experts.split(",") if x]
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    params = parse_params(a.params)
    wl_dir = (a.workdir / f"workload-{a.params}-seed{a.seed}").resolve()
    run_dir = (a.workdir / f"runs-{a.params}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    a.results_dir.mkdir(parents=True, exist_ok=True)

    print(f"workload: {wl_dir} (generating if needed)", flush=True)
    t0 = time.perf_counter()
    wl = make_workload(wl_dir, params, max(counts), seed=a.seed)
    print(f"workload ready in {time.perf_counter() - t0:.1f}s: {wl['params'] / 1e6:.1f}M params, "
          f"{wl['bytes_per_model'] / 1e9:.2f} GB per model", flush=True)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))

    fl_cmd = None if a.skip_fusionlang else find_fusionlang(a.fusionlang)
    mk_cmd = None if a.skip_mergekit else find_mergekit(a.mergekit)
    floor_cmd = [sys.executable, str(HERE / "handwritten_ta.py")]
    mk_flags = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                "--random-seed", str(SEED)]
    if a.mergekit_shard_size:
        mk_flags += ["--out-shard-size", a.mergekit_shard_size]

    records: list[dict] = []
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(x) for x in
                                        ["bench/run_bench.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
        "workload": {"params": wl["params"], "config": wl["config"], "dir": str(wl_dir),
                     "noise": "0.01 * rms(tensor)", "dtype": "bfloat16"},
        "settings": {"ta_scale": TA_SCALE, "ties_density": TIES_DENSITY,
                     "dare_density": DARE_DENSITY, "seed": SEED,
                     "mergekit_dtype": a.mergekit_dtype, "mergekit_flags": mk_flags,
                     "threads": a.threads, "repeat": a.repeat},
        "fusionlang_cmd": fl_cmd,
        "mergekit_cmd": mk_cmd,
        "mergekit_version": version_of(mk_cmd, "import importlib.metadata as m; "
                                       "print(m.version('mergekit'))") if mk_cmd else None,
    }
    if os.getloadavg()[0] > 0.5:
        print(f"WARNING: load average {os.getloadavg()[0]:.2f} at start: other processes are "
              "competing for the CPU and timings will be noisy", flush=True)

    def run_case(tool: str, method: str, n: int, cmd: list[str], outs: list[Path],
                 **extra) -> dict:
        rec = {"tool": tool, "method": method, "experts": n, **extra}
        best = None
        for r in range(a.repeat):
            for o in outs:
                shutil.rmtree(o, ignore_errors=True)
            warm_cache([wl_dir / "base"] + [wl_dir / f"expert_{i}" for i in range(1, n + 1)])
            log = run_dir / f"{tool}-{method}-{n}-{r}.log"
            load = os.getloadavg()[0]
            res = run_measured(cmd, env, log, a.timeout, a.mem_limit_mb)
            res["loadavg_1m"] = round(load, 2)
            if res["rc"] != 0:
                res["error"] = tail(log, 4000) + ("\n" + res["killed"] if res["killed"] else "")
            elif not all(o.exists() for o in outs):
                res["rc"], res["error"] = -1, "exit 0 but output missing: " + tail(log)
            if best is None or (res["rc"] == 0 and (best["rc"] != 0 or
                                                    res["wall_s"] < best["wall_s"])):
                best = res
            if res["rc"] != 0:
                break
        rec.update(best)
        status = "ok" if rec["rc"] == 0 else f"FAILED rc={rec['rc']}"
        print(f"  {tool:10s} {method:15s} experts={n}: {rec['wall_s']:8.2f}s  "
              f"peak anon {rec['peak_anon_mb']:8.1f} MB  {status}", flush=True)
        records.append(rec)
        return rec

    for n in counts:
        base = wl_dir / "base"
        experts = [wl_dir / f"expert_{i}" for i in range(1, n + 1)]
        print(f"== experts={n}", flush=True)
        outs: dict[tuple[str, str], Path] = {}

        if not a.skip_floor and "task_arithmetic" in methods:
            out = run_dir / f"out-floor-ta-{n}"
            cmd = floor_cmd + ["--base", str(base), "--experts", *map(str, experts),
                               "--scale", str(TA_SCALE), "--out", str(out)]
            if run_case("floor", "task_arithmetic", n, cmd, [out])["rc"] == 0:
                outs[("floor", "task_arithmetic")] = out

        for method in methods:
            if fl_cmd:
                out = run_dir / f"out-fl-{method}-{n}"
                spec = run_dir / f"{method}-{n}.fuse"
                spec.write_text(fusionlang_spec(base, experts, [("m", method, out)]))
                if run_case("fusionlang", method, n, fl_cmd + ["run", str(spec)],
                            [out])["rc"] == 0:
                    outs[("fusionlang", method)] = out
            else:
                records.append({"tool": "fusionlang", "method": method, "experts": n,
                                "rc": None, "error": "skipped" if a.skip_fusionlang else
                                "fusionlang not found (PATH, .venv/bin, or --fusionlang)"})
            if mk_cmd:
                out = run_dir / f"out-mk-{method}-{n}"
                cfg = run_dir / f"{method}-{n}.yml"
                cfg.write_text(mergekit_yaml(base, experts, method, a.mergekit_dtype))
                if run_case("mergekit", method, n, mk_cmd + [str(cfg), str(out)] + mk_flags,
                            [out])["rc"] == 0:
                    outs[("mergekit", method)] = out

        def run_multi(name: str, merge_methods: list[str], n: int, base: Path, experts: list[Path]) -> None:
            """Several merges in one fusionlang spec (outputs removed afterwards)."""
            merges = [(f"m{i}", m, run_dir / f"out-fl3-{name}{i}-{n}") for i, m in enumerate(merge_methods)]
            spec = run_dir / f"{name}-{n}.fuse"
            spec.write_text(fusionlang_spec(base, experts, merges))
            run_case("fusionlang", "+".join(merge_methods), n, fl_cmd + ["run", str(spec)],
                     [o for _, _, o in merges], multi=True)
            if not a.keep_outputs:
                for _, _, o in merges:
                    shutil.rmtree(o, ignore_errors=True)

        if fl_cmd and not a.skip_multi and len(methods) > 1:
            run_multi("multi", methods, n, base, experts)
        if fl_cmd and not a.skip_multi and "task_arithmetic" in methods:
            # a sweep: the same method at three settings (what tune() and scale searches do)
            run_multi("sweep", [f"task_arithmetic@{x}" for x in (0.2, TA_SCALE, 0.5)], n, base, experts)

        if not a.no_verify:
            pairs = [(("fusionlang", "task_arithmetic"), ("floor", "task_arithmetic")),
                     (("mergekit", "task_arithmetic"), ("floor", "task_arithmetic")),
                     (("fusionlang", "ties"), ("mergekit", "ties")),
                     (("fusionlang", "dare_ties"), ("mergekit", "dare_ties"))]
            for x, y in pairs:
                if x in outs and y in outs:
                    c = compare_outputs(outs[x], outs[y])
                    c.update(kind="compare", a=x[0], b=y[0], method=x[1], experts=n)
                    records.append(c)
                    print(f"  compare {x[0]} vs {y[0]} ({x[1]}): {c}", flush=True)
        if not a.keep_outputs:
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)

    meta["loadavg_end"] = os.getloadavg()
    result = {"meta": meta, "records": records}
    (a.results_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    (a.results_dir / "results.md").write_text(md)
    print()
    print(md)
    return 0


# --------------------------------------------------------------------------- report

def _fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def _summary(rec: dict) -> str:
    """The first error-looking line of a failed run's output (else its last line)."""
    if rec.get("killed"):
        return rec["killed"]
    lines = [x.strip() for x in (rec.get("error") or "").strip().splitlines() if x.strip()]
    if not lines:
        return f"rc={rec.get('rc')}"
    for x in lines:
        if "error" in x.lower() and not x.lower().startswith("traceback"):
            return x[:240].replace("|", "\\|")
    return lines[-1][:240].replace("|", "\\|")


def render_markdown(result: dict) -> str:
    meta, recs = result["meta"], result["records"]
    runs = [r for r in recs if r.get("kind") != "compare"]

    def get(tool, method, n, multi=False):
        for r in runs:
            if (r["tool"], r["method"], r["experts"], bool(r.get("multi"))) == (
                    tool, method, n, multi):
                return r
        return None

    def t(r):
        return r["wall_s"] if r and r.get("rc") == 0 else None

    def mem(r):
        return r["peak_anon_mb"] if r and r.get("rc") == 0 else None

    def ratio(x, y):
        return x / y if x is not None and y else None

    w = meta["workload"]
    c = w["config"]
    lines = [
        "# fusionlang vs MergeKit vs hand-written loop",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']['cpu']}, "
        f"{meta['machine']['cores']} cores, {meta['machine']['memory']} RAM; "
        f"load average at start {meta['loadavg_start'][0]:.2f}, end {meta['loadavg_end'][0]:.2f}  ",
        f"Workload: Llama, {w['params'] / 1e6:.1f}M params (hidden {c['hidden_size']}, "
        f"{c['num_hidden_layers']} layers, vocab {c['vocab_size']}), bf16; experts = base + "
        f"{w['noise']}·N(0,1)  ",
        f"MergeKit {meta.get('mergekit_version') or '—'}: `dtype: "
        f"{meta['settings']['mergekit_dtype']}`, `out_dtype: bfloat16`, flags "
        f"`{' '.join(meta['settings']['mergekit_flags'])}`; threads: "
        f"{meta['settings']['threads'] or 'tool default'}; best of {meta['settings']['repeat']}",
        "",
        "Wall time in seconds (whole process: start-up, read, merge, write); peak anonymous "
        "RSS of the process tree in MB (file-backed pages excluded). Ratios < 1 favour "
        "fusionlang. floor = hand-written streaming task arithmetic (bench/handwritten_ta.py).",
        "",
        "| method | experts | fusionlang s | mergekit s | fl/mk | floor s | fl/floor "
        "| fl anon MB | mk anon MB | floor anon MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    methods = list(dict.fromkeys(r["method"] for r in runs if not r.get("multi")))
    counts = sorted({r["experts"] for r in runs})
    for m in methods:
        for n in counts:
            fl, mk = get("fusionlang", m, n), get("mergekit", m, n)
            fr = get("floor", "task_arithmetic", n)
            if not any(x and x.get("rc") is not None for x in (fl, mk)) and m != "task_arithmetic":
                continue
            flt = t(fl) if fl else None
            fl_cell = _fmt(flt) if flt is not None else ("failed" if fl and fl.get("rc") else "—")
            mk_cell = (_fmt(t(mk)) if t(mk) is not None
                       else ("failed" if mk and mk.get("rc") else "—"))
            lines.append(
                f"| {m} | {n} | {fl_cell} | {mk_cell} | {_fmt(ratio(flt, t(mk)))} | "
                f"{_fmt(t(fr))} | {_fmt(ratio(flt, t(fr)))} | {_fmt(mem(fl), '.0f')} | "
                f"{_fmt(mem(mk), '.0f')} | {_fmt(mem(fr), '.0f')} |")
    multi = [r for r in runs if r.get("multi")]
    if multi:
        lines += ["", "Three merges in one fusionlang spec vs the slowest single-merge spec "
                  "(target ≤ 1.3×) and vs the sum of the three single runs (`@x`: task "
                  "arithmetic at scale x; its single run is the one at scale 0.3):", "",
                  "| merges | experts | 3-in-1 s | slowest single s | ratio | sum of singles s "
                  "| anon MB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in multi:
            singles = [t(get("fusionlang", m.partition("@")[0], r["experts"])) for m in r["method"].split("+")]
            ok = all(s is not None for s in singles)
            slow = max(singles) if ok else None
            lines.append(
                f"| {r['method']} | {r['experts']} | "
                f"{_fmt(t(r)) if t(r) is not None else 'failed'} | {_fmt(slow)} | "
                f"{_fmt(ratio(t(r), slow))} | {_fmt(sum(singles) if ok else None)} | "
                f"{_fmt(mem(r), '.0f')} |")
    cmps = [r for r in recs if r.get("kind") == "compare"]
    if cmps:
        lines += ["", "Output agreement (max |Δ| over all tensors, fraction of elements that "
                  "differ):", "", "| method | experts | a | b | max abs diff | frac differing |",
                  "|---|---:|---|---|---:|---:|"]
        for r in cmps:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['experts']} | {r['a']} | {r['b']} | "
                             f"{r['error']} | |")
            else:
                lines.append(f"| {r['method']} | {r['experts']} | {r['a']} | {r['b']} | "
                             f"{r['max_abs_diff']:.3g} | {r['frac_diff']:.3g} |")
    fails = [r for r in runs if r.get("rc") not in (0,) and r.get("error") != "skipped"]
    skipped = sorted({r["tool"] for r in runs if r.get("error") == "skipped"})
    if skipped:
        lines += ["", f"Skipped on purpose in this run: {', '.join(skipped)}."]
    if fails:
        lines += ["", "Not run or failed:", ""]
        for r in fails:
            lines.append(f"- {r['tool']} {r['method']} experts={r['experts']}: "
                         f"{_summary(r)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
