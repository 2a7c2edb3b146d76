"""A search's part of an evaluation report: its trials as a table (the Pareto front marked)
and a PNG plot, `search-MERGE.png` beside report.json (drawn with pillow, like report.png).

Single objective: the objective of each trial by trial number, with the best so far as a
line. Two objectives: each trial as a point (first objective across, second up), the
Pareto front joined by a line, the chosen point ringed.
"""

from __future__ import annotations

import math
from pathlib import Path

MAX_ROWS = 24  # a longer search prints its Pareto front only (report.json has every trial)


def write(report: dict, report_dir: Path) -> None:
    """Plot every search of the report into `report_dir` and name the file in its record."""
    for rec in report.get("tuning", ()):
        if rec.get("search"):
            name = f"search-{rec['merge']}.png"
            plot(rec, report_dir / name)
            rec["search"]["plot"] = name


def show(console, report: dict) -> None:
    """Print each search's trials (or, past MAX_ROWS, its Pareto front) as a table."""
    from rich.table import Table

    for rec in report.get("tuning", ()):
        s = rec.get("search")
        if not s:
            continue
        trials = rec["candidates"]
        rows = trials if len(trials) <= MAX_ROWS else [t for t in trials if t.get("pareto")]
        multi = len(s["objectives"]) > 1
        what = "Pareto front" if multi else "best"
        t = Table(title=f"search of {rec['merge']} ({s['sampler']}, seed {s['seed']}, {len(trials)} trials, "
                  f"{s['evaluated']} evaluated, {s['reused']} reused; '{rec['split']}' split)"
                  + ("" if rows is trials else f": its {what}"), title_justify="left")
        t.add_column("trial", justify="right")
        for p in rec["params"]:
            t.add_column(p, justify="right")
        for o in s["objectives"]:
            t.add_column(o + (" (%)" if o == "accuracy" else ""), justify="right")
        t.add_column(what)
        t.add_column("chosen")
        for tr in rows:
            t.add_row(str(tr["trial"]), *(f"{tr['values'][p]:.4g}" for p in rec["params"]),
                      *(_cell(o, tr["objectives"][o]) for o in s["objectives"]),
                      "*" if tr.get("pareto") else "", "<-" if tr["trial"] == s["chosen_trial"] else "",
                      style="bold" if tr["trial"] == s["chosen_trial"] else None)
        console.print(t)


def _cell(objective: str, v: float) -> str:
    return f"{100 * v:.1f}" if objective == "accuracy" else f"{v:.4f}"


def plot(rec: dict, path: Path) -> None:
    """A search's trials as a PNG (see the module docstring)."""
    from PIL import Image, ImageDraw

    s = rec["search"]
    objs = s["objectives"]
    trials = rec["candidates"]
    chosen = s["chosen_trial"]
    if len(objs) == 1:
        o = objs[0]
        xs = [float(t["trial"]) for t in trials]
        ys = [t["objectives"][o] for t in trials]
        xlabel, ylabel = "trial", o
    else:
        xs = [t["objectives"][objs[0]] for t in trials]
        ys = [t["objectives"][objs[1]] for t in trials]
        xlabel, ylabel = objs[0], objs[1]
    xlabel, ylabel = (_better(x) for x in (xlabel, ylabel))
    left, top, w, h = 70, 30, 480, 320
    img = Image.new("RGB", (left + w + 30, top + h + 80), "white")
    draw = ImageDraw.Draw(img)
    fin = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if not fin:
        img.save(path)
        return
    x0, x1 = _span([x for x, _ in fin])
    y0, y1 = _span([y for _, y in fin])

    def at(x, y):
        return left + (x - x0) / (x1 - x0) * w, top + h - (y - y0) / (y1 - y0) * h

    draw.rectangle([left, top, left + w, top + h], outline=(120, 120, 120))
    for k in range(5):  # tick labels at the ends and in between
        fx, fy = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        px, _ = at(fx, y0)
        _, py = at(x0, fy)
        draw.line([(left - 4, py), (left + w, py)], fill=(230, 230, 230))
        draw.text((6, py - 6), _tick(ylabel, fy), fill="black")
        draw.text((px - 14, top + h + 6), _tick(xlabel, fx), fill="black")
    draw.text((left + w // 2 - 60, top + h + 24), xlabel, fill="black")
    draw.text((6, 8), ylabel, fill="black")
    if len(objs) == 1:  # the best so far
        better = max if _maximize(objs[0]) else min
        best, line = None, []
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                best = y if best is None else better(best, y)
            if best is not None:
                line.append(at(x, best))
        if len(line) > 1:
            draw.line(line, fill=(31, 119, 180), width=2)
    else:  # the Pareto front, joined in the order of the first objective
        front = sorted((xs[i], ys[i]) for i, t in enumerate(trials) if t.get("pareto")
                       and math.isfinite(xs[i]) and math.isfinite(ys[i]))
        if len(front) > 1:
            draw.line([at(x, y) for x, y in front], fill=(31, 119, 180), width=2)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        px, py = at(x, y)
        color = (31, 119, 180) if trials[i].get("pareto") else (150, 150, 150)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        if i == chosen:
            draw.ellipse([px - 8, py - 8, px + 8, py + 8], outline=(214, 39, 40), width=2)
    legend = f"{rec['merge']}: {len(trials)} trials ({s['sampler']}); chosen = red ring"
    legend += "; blue = Pareto front" if len(objs) > 1 else "; line = best so far"
    draw.text((left, top + h + 44), legend, fill="black")
    img.save(path)


def _better(label: str) -> str:
    if label == "trial":
        return label
    return f"{label} ({'higher' if _maximize(label) else 'lower'} is better)"


def _maximize(objective: str) -> bool:
    from ..lang.search_args import OBJECTIVES

    return OBJECTIVES[objective][0] == "maximize"


def _span(v: list[float]) -> tuple[float, float]:
    lo, hi = min(v), max(v)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _tick(label: str, v: float) -> str:
    label = label.split(" (")[0]
    if label == "trial":
        return f"{v:.0f}"
    return f"{100 * v:.1f}%" if label == "accuracy" else f"{v:.3g}"
