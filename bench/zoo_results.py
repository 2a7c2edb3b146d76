"""Markdown tables for docs/RESULTS.md from the report.json files an `eval` writes.

    python bench/zoo_results.py out/bench_text out/bench_text_pair

prints, per report: the accuracy table (test split, %), with normalized accuracy and
forgetting for merged models, and the scale each tune() chose on the validation split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(report: dict) -> str:
    tasks = report["tasks"]
    head = ["model", *tasks, "avg", "norm. avg", "forgetting"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, row in report["rows"].items():
        acc = row["accuracy"]
        cells = [name, *(f"{100 * acc[t]:.1f}" for t in tasks), f"**{100 * row['average']:.1f}**"]
        if "normalized_accuracy" in row:
            norm = sum(row["normalized_accuracy"].values()) / len(tasks)
            cells += [f"{100 * norm:.1f}", f"{100 * row['forgetting']:.1f}"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning(report: dict) -> str:
    lines = []
    for rec in report.get("tuning", []):
        if rec["merge"] not in report["rows"]:
            continue
        cands = ", ".join(f"{c['values'][rec['params'][0]]:g}: {100 * c['average']:.1f}" for c in rec["candidates"])
        chosen = ", ".join(f"{k}={v:g}" for k, v in rec["chosen"].items())
        lines.append(f"- `{rec['merge']}`: **{chosen}** (mean {rec['split']} accuracy per candidate: {cands})")
    return "\n".join(lines)


def main(dirs: list[str]) -> None:
    for d in dirs:
        report = json.loads((Path(d) / "report.json").read_text())
        print(f"#### {d}\n\n{table(report)}\n")
        t = tuning(report)
        if t:
            print(f"Scales chosen on the validation split:\n\n{t}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
