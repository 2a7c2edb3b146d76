"""The LLM zoo's results table from a `specs/llm_moe.fuse` report (+ the zoo's manifest).

    python bench/llm_zoo_table.py out/llm_moe/report.json [--zoo ~/.cache/fusionlang/zoo/llm] > table.md

Columns, MergeBench-style, per model: perplexity on each domain's held-out rows; the gain
retained, mean over domains of (base loss - model loss) / (base loss - that domain's
expert loss) (1 = every domain as good as its own expert, 0 = the base); forgetting, mean
over domains of max(0, model loss - base loss) in nats per token; latency per batch and
peak memory as the report measured them; exact match (%) on the domains whose rows have
answers, when the report has exact_match() tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def table(report: dict, manifest: dict | None = None) -> str:
    """Markdown table (str) of the report's rows. ``report``: report.json's dict; the
    domain experts are the rows named like the tasks. Raises KeyError when the report has
    no ``base`` row or a task has no expert row."""
    tasks = report["perplexity_tasks"]
    rows = report["rows"]
    base = rows["base"]["loss"]
    expert = {t: rows[t]["loss"][t] for t in tasks}
    ems = report.get("exact_match_tasks", [])
    head = "| model | " + " | ".join(f"{t} ppl" for t in tasks) + "".join(f" | {t} EM" for t in ems) + \
        " | gain retained | forgetting (nats) | s / batch | peak MB |"
    out = [head, "|---|" + "---:|" * (len(tasks) + len(ems) + 4)]
    for name, r in rows.items():
        loss = r["loss"]
        kept = sum((base[t] - loss[t]) / (base[t] - expert[t]) for t in tasks) / len(tasks)
        forget = sum(max(0.0, loss[t] - base[t]) for t in tasks) / len(tasks)
        out.append(f"| {name} | " + " | ".join(f"{r['perplexity'][t]:.2f}" for t in tasks)
                   + "".join(f" | {100 * r['accuracy'][t]:.1f} %" for t in ems)
                   + f" | {kept:.2f} | {forget:.3f} | {r['latency_per_batch_s']:.2f}"
                   + f" | {r['peak_mem_bytes'] / 2**20:.0f} |")
    if manifest and not ems:
        em = [(t, v["exact_match"]) for t, v in manifest["tasks"].items() if "exact_match" in v]
        if em:
            out += ["", "Exact match (greedy, held-out rows; measured by `zoo build`):", "",
                    "| task | base | expert |", "|---|---:|---:|"]
            out += [f"| {t} | {100 * v['pretrained']:.1f} % | {100 * v['finetuned']:.1f} % |" for t, v in em]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--zoo", type=Path, default=None, help="zoo directory (for exact match)")
    a = ap.parse_args(argv)
    manifest = json.loads((a.zoo / "zoo.json").read_text()) if a.zoo else None
    sys.stdout.write(table(json.loads(a.report.read_text()), manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
