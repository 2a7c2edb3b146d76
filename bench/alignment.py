"""Alignment on the nets zoo: loss and accuracy along the linear path between two models
trained from different seeds, naive versus aligned, and N-model fusion.

    fusionlang zoo build nets
    OMP_NUM_THREADS=2 python bench/alignment.py [--zoo nets] [--out docs/results]

writes docs/results/alignment.json and alignment.png and prints the markdown tables of
docs/RESULTS.md ("Alignment"). The aligned models come from the same functions the
`align` / `wasserstein_barycenter` stages run (fusionlang.stages.align, .matching);
activations are taken on 1000 rows of the training split (zoo_data(..., n=1000, seed=0)).
The test split (10,000 images) scores every model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fusionlang.arch import nets as N
from fusionlang.arch.permutation import derive
from fusionlang.stages import align as A
from fusionlang.stages import matching as X
from fusionlang.stages.data import load as load_data
from fusionlang.zoo.evaluate import find_task, load_task_data
from fusionlang.zoo.nets import score
from fusionlang.zoo.paths import zoo_dir

LAMBDAS = [i / 10 for i in range(11)]


def lerp(a: dict, b: dict, t: float) -> dict:
    return {k: (1 - t) * a[k] + t * b[k] for k in a}


def run_model(cfg: dict, state: dict, test) -> dict:
    m = N.build(cfg)
    m.load_state_dict(state, strict=False)
    return score(m, test.images, test.labels, cfg)


def reset_bn(cfg: dict, state: dict, images) -> dict:
    """BatchNorm running statistics re-estimated on `images` (Git Re-Basin's "reset BN"
    for interpolated CNNs; not a fusionlang stage: shown for reference)."""
    m = N.build(cfg)
    m.load_state_dict(state, strict=False)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # a cumulative average
    m.train()
    x = N.prepare(images, cfg)
    with torch.no_grad():
        for s in range(0, len(x), 500):
            m(x[s:s + 500])
    return N.state_for_files(m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="nets")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--n", type=int, default=1000, help="rows of the training split for activations")
    args = ap.parse_args()
    root = zoo_dir(args.zoo)
    task = find_task("fashion", args.zoo)
    ds = load_task_data(task)
    test = ds.test
    calib = {"kind": "zoo", "task": "fashion", "zoo": args.zoo, "split": "train", "n": args.n, "seed": 0}
    ex = load_data(calib)
    manifest = json.loads((root / "zoo.json").read_text())
    models = list(manifest["tasks"]["fashion"]["models"])
    out: dict = {"zoo": args.zoo, "test_n": len(test), "calibration_rows": len(ex), "paths": {}, "fusion": {}}
    for arch in ("mlp", "cnn"):
        names = [m for m in models if m.startswith(arch)]
        cfg = json.loads((root / names[0] / "config.json").read_text())
        states = [A.read_state(str(root / n)) for n in names]
        spec = derive(cfg, {k: tuple(v.shape) for k, v in states[0].items()})
        t0 = time.perf_counter()
        acts = [A.model_activations(str(root / n), calib, ex, spec, {"batch_size": 250, "max_samples": 20000, "seed": 0},
                              "cpu") for n in names]
        t_acts = time.perf_counter() - t0
        a, b = states[0], states[1]
        t0 = time.perf_counter()
        wm, _ = A.align_states(spec, a, b, "weight")
        t_wm = time.perf_counter() - t0
        t0 = time.perf_counter()
        ot, _ = A.align_states(spec, a, b, "emd", acts[0], acts[1])
        t_ot = time.perf_counter() - t0
        variants = {"naive": b, "weight matching": wm, "OT (activations, emd)": ot}
        path = {v: [run_model(cfg, lerp(a, bb, t), test) for t in LAMBDAS] for v, bb in variants.items()}
        if arch == "cnn":
            train_imgs = ds.train.images[:2000]
            path["weight matching + BN reset"] = [run_model(cfg, reset_bn(cfg, lerp(a, wm, t), train_imgs), test)
                                                  for t in LAMBDAS]
        out["paths"][arch] = {"models": names[:2], "lambdas": LAMBDAS, "path": path,
                              "seconds": {"activations": round(t_acts, 2), "weight_matching": round(t_wm, 2),
                                          "ot_emd": round(t_ot, 2)}}
        ends = [run_model(cfg, s, test) for s in states]
        naive_n = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
        ref_aligned = [states[0]] + [A.align_states(spec, states[0], s, "weight")[0] for s in states[1:]]
        wm_n = {k: sum(s[k] for s in ref_aligned) / len(states) for k in states[0]}
        t0 = time.perf_counter()
        bary_w, _ = X.barycenter(spec, states)
        bary_a, _ = X.barycenter(spec, states, acts=acts)
        t_bary = time.perf_counter() - t0
        fusion = {"endpoints (mean)": {k: sum(e[k] for e in ends) / len(ends) for k in ("accuracy", "loss")},
                  "naive average": run_model(cfg, naive_n, test),
                  "weight matching to model 0, average": run_model(cfg, wm_n, test),
                  "wasserstein_barycenter (weights)": run_model(cfg, bary_w, test),
                  "wasserstein_barycenter (activations)": run_model(cfg, bary_a, test)}
        out["fusion"][arch] = {"models": names, "rows": fusion, "barycenter_s": round(t_bary, 2)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "alignment.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, Path(args.out) / "alignment.png")
    print(tables(out))


def tables(out: dict) -> str:
    lines = []
    for arch, p in out["paths"].items():
        lines += [(f"\n{arch.upper()} {p['models'][0]} -> {p['models'][1]}: test accuracy % (loss) along "
                  "(1-λ)·θ_a + λ·θ_b"), "", "| λ | " + " | ".join(p["path"]) + " |",
                  "|---:|" + "---:|" * len(p["path"])]
        for i, t in enumerate(p["lambdas"]):
            cells = [f"{100 * r[i]['accuracy']:.1f} ({r[i]['loss']:.3f})" for r in p["path"].values()]
            lines.append(f"| {t:.1f} | " + " | ".join(cells) + " |")
    for arch, f in out["fusion"].items():
        lines += [f"\n{arch.upper()}: {len(f['models'])} models fused", "", "| | test accuracy % | loss |",
                  "|---|---:|---:|"]
        for name, r in f["rows"].items():
            lines.append(f"| {name} | {100 * r['accuracy']:.1f} | {r['loss']:.3f} |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    """Accuracy (top) and loss (bottom) along λ, one column per architecture (the default
    PIL font has no λ: the labels spell it)."""
    from PIL import Image, ImageDraw

    colors = {"naive": (214, 39, 40), "weight matching": (31, 119, 180), "OT (activations, emd)": (44, 160, 44),
              "weight matching + BN reset": (148, 103, 189)}
    w, h, left, top = 360, 200, 50, 30
    archs = list(out["paths"])
    img = Image.new("RGB", (len(archs) * (w + left + 20) + 20, 2 * (h + 50) + 110), "white")
    d = ImageDraw.Draw(img)
    for ci, arch in enumerate(archs):
        p = out["paths"][arch]
        x0 = 20 + ci * (w + left + 20) + left
        loss_max = max(r["loss"] for rs in p["path"].values() for r in rs)
        for ri, (key, lo, hi, label) in enumerate((("accuracy", 0.0, 1.0, "accuracy"),
                                                   ("loss", 0.0, loss_max, "test loss"))):
            y0 = top + ri * (h + 50)
            d.rectangle([x0, y0, x0 + w, y0 + h], outline=(180, 180, 180))
            d.text((x0, y0 - 16), f"{arch.upper()}: {label} along lambda (0: model a, 1: model b)", fill="black")
            for k in range(5):
                v = lo + (hi - lo) * k / 4
                y = y0 + h - int(h * k / 4)
                d.line([(x0 - 3, y), (x0 + w, y)], fill=(230, 230, 230))
                d.text((x0 - 44, y - 6), f"{100 * v:.0f}%" if key == "accuracy" else f"{v:.2f}", fill="black")
            for k, t in enumerate(p["lambdas"]):
                if k % 5 == 0:
                    d.text((x0 + int(w * t) - 6, y0 + h + 4), f"{t:.1f}", fill="black")
            for name, rs in p["path"].items():
                pts = [(x0 + int(w * t), y0 + h - int(h * (r[key] - lo) / ((hi - lo) or 1)))
                       for t, r in zip(p["lambdas"], rs)]
                d.line(pts, fill=colors.get(name, (0, 0, 0)), width=2)
    y = 2 * (h + 50) + 40
    for i, (name, c) in enumerate(colors.items()):
        d.rectangle([20 + left, y + 16 * i, 30 + left, y + 10 + 16 * i], fill=c)
        d.text((36 + left, y - 1 + 16 * i), name, fill="black")
    img.save(path)


if __name__ == "__main__":
    main()
