"""Plan emission (text, JSON, dot) and JSON loading.

The text form is the main debugging surface: one line per node in execution order,
`%17 = ties(%3, %9; density=0.2)  # spec.fuse:14`, deterministic across runs.
"""

from __future__ import annotations

import json

from .graph import OutputSpec, Plan, PlanNode, SourceSpec
from .validate import check_loaded_plan

FORMAT_VERSION = 1


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def node_order(plan: Plan) -> list[str]:
    return plan.order if plan.order and set(plan.order) == set(plan.nodes) else plan.topo_order()


def _rel(path: str, spec_file: str) -> str:
    """Paths relative to the spec's directory, so plans read the same on every machine."""
    import os

    base = os.path.dirname(os.path.abspath(spec_file)) if spec_file else os.getcwd()
    return os.path.relpath(path, base)


def to_text(plan: Plan) -> str:
    import os

    order = node_order(plan)
    num = {nid: i for i, nid in enumerate(order)}
    lines = [f"# plan for {os.path.basename(plan.spec_file)}: {len(plan.nodes)} nodes, {len(plan.outputs)} outputs"]
    for k, s in sorted(plan.sources.items()):
        if s.stage:
            lines.append(stage_line(k, s.stage, len(s.tensors)))
        else:
            lines.append(f"source {k} = {json.dumps(_rel(s.path, plan.spec_file))}")
    phase = None
    for nid in order:
        n = plan.nodes[nid]
        p = plan.phase_of.get(nid)
        if p is not None and p != phase:
            lines.append(f"# phase {p}")
            phase = p
        if n.op == "load":
            body = f"load({n.param('source')}, {json.dumps(n.param('tensor'))})"
        else:
            args = ", ".join(f"%{num[i]}" for i in n.inputs)
            ps = "; ".join(f"{k}={_fmt_value(v)}" for k, v in n.params)
            body = f"{n.op}({args}{'; ' if args and ps else ''}{ps})"
        loc = f"  # {n.loc}" if n.loc else ""
        lines.append(f"%{num[nid]} = {body}{loc}")
    for o in plan.outputs.values():
        lines.append(f"output {o.name} -> {json.dumps(_rel(o.path, plan.spec_file))}  # {len(o.tensors)} tensors, from {o.reference}"
                     + (f"; {o.note}" if o.note else ""))
        for t in o.tensors:
            parts = o.parts(t)
            if len(parts) == 1:
                lines.append(f"  {json.dumps(t)} = %{num[parts[0][1]]}")
            else:
                lines.append(f"  {json.dumps(t)} = rows " + ", ".join(f"{a}: %{num[nid]}" for a, nid in parts))
    return "\n".join(lines) + "\n"


def stage_line(key: str, stage: dict, n_tensors: int) -> str:
    """How `compile` shows a model stage: what it computes and what it costs."""
    est = stage.get("estimate", {})
    params = ", ".join(f"{k}={_fmt_value(v)}" for k, v in stage.get("params", {}).items()
                       if k not in stage.get("quiet", ()))
    mb = est.get("peak_bytes", 0) / 1e6
    if stage["kind"] in ("align", "barycenter"):  # a whole model, from weights or activations
        work = (f"activations of {est.get('examples', '?')} examples in {est.get('batches', '?')} forward passes"
                if est.get("examples") else "from weights")
        return (f"stage {key} = {stage['kind']}({stage['model']}, {stage.get('data_text', '')}; {params})  "
                f"# {n_tensors} tensors; {work}; {est.get('models_resident', 1)} models resident, ~{mb:.0f} MB")
    return (f"stage {key} = {stage['kind']}({stage.get('of', stage['model'])}, {stage.get('data_text', '')}; {params})  "
            f"# {n_tensors} statistics; {est.get('examples', '?')} examples in {est.get('batches', '?')} "
            f"{est.get('passes', '')} passes; {est.get('models_resident', 1)} model{'s' * (est.get('models_resident', 1) != 1)} "
            f"resident, ~{mb:.0f} MB")


def to_json(plan: Plan) -> str:
    order = node_order(plan)
    return json.dumps({
        "fusionlang_plan": FORMAT_VERSION,
        "spec_file": plan.spec_file,
        "spec_files": plan.spec_files,
        "spec_text": plan.spec_text,
        "sources": {k: {"path": s.path, "config": s.config, "at": s.at, "stage": s.stage,
                        "tensors": {t: [d, list(sh), f] for t, (d, sh, f) in s.tensors.items()}}
                    for k, s in plan.sources.items()},
        "nodes": [{"id": nid, "op": plan.nodes[nid].op, "inputs": list(plan.nodes[nid].inputs),
                   "params": [[k, v] for k, v in plan.nodes[nid].params], "group": plan.nodes[nid].group,
                   "loc": plan.nodes[nid].loc,
                   "shape": list(plan.nodes[nid].shape) if plan.nodes[nid].shape is not None else None,
                   "phase": plan.phase_of.get(nid, 0)} for nid in order],
        "outputs": [{"name": o.name, "path": o.path, "dtype": o.dtype, "tensors": o.tensors, "dtypes": o.dtypes,
                     "shapes": {k: list(v) for k, v in o.shapes.items()}, "reference": o.reference,
                     "config_overrides": o.config_overrides, "note": o.note, "description": o.description,
                     # every location of an output under "loc" (display text and span), as for nodes
                     "loc": {"text": o.loc, "at": o.at},
                     "blocks": {t: [[a, nid] for a, nid in parts] for t, parts in o.blocks.items()},
                     **({"tokenizer": o.tokenizer} if o.tokenizer else {})}
                    for o in plan.outputs.values()],
        "history": plan.history,
    }, indent=1)


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _loc_text(v) -> str:
    """An output's display location ("spec.fuse:10") from its stored "loc"."""
    return str(v.get("text", "")) if isinstance(v, dict) else str(v)


def _at(v) -> tuple | None:
    """A stored (file, line, column[, end line, end column]) location, or None."""
    if not isinstance(v, list) or len(v) not in (3, 5):
        return None
    return (str(v[0]), *(int(x) for x in v[1:]))


def from_json(text: str) -> Plan:
    """Load a plan written by `to_json`; raises ValueError naming the problem when the
    text is not one, or is one that was edited into an invalid plan
    (`validate.check_loaded_plan`: unknown op, dangling input, wrong parameter types)."""
    try:
        plan = _from_json(text)
    except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise ValueError(f"damaged plan ({type(e).__name__}: {e})") from None
    check_loaded_plan(plan)
    return plan


def _from_json(text: str) -> Plan:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("fusionlang_plan") != FORMAT_VERSION:
        raise ValueError("not a fusionlang plan (or a plan from another format version)")
    plan = Plan()
    plan.spec_file, plan.spec_text = data["spec_file"], data["spec_text"]
    plan.spec_files = [str(f) for f in data.get("spec_files", [])]
    for k, s in data["sources"].items():
        plan.sources[k] = SourceSpec(k, s["path"], {t: (d, tuple(sh), f) for t, (d, sh, f) in s["tensors"].items()}, s["config"],
                                     _at(s.get("at")), s.get("stage"))
    nodes = {}
    for n in data["nodes"]:
        params = tuple((k, _tuplify(v)) for k, v in n["params"])
        nodes[n["id"]] = PlanNode(n["op"], tuple(n["inputs"]), params, n["group"], n["loc"],
                                  tuple(n["shape"]) if n["shape"] is not None else None)
        plan.phase_of[n["id"]] = n["phase"]
    plan.replace_nodes(nodes)
    plan.order = [n["id"] for n in data["nodes"]]
    for o in data["outputs"]:
        key, k = o["name"], 1
        while key in plan.outputs:  # one merge saved twice (as the lowering keys them)
            k += 1
            key = f"{o['name']}#{k}"
        plan.outputs[key] = OutputSpec(o["name"], o["path"], o["dtype"], o["tensors"], o["dtypes"],
                                       {k: tuple(v) for k, v in o["shapes"].items()}, o["reference"],
                                       o["config_overrides"], _loc_text(o["loc"]),
                                       {t: [(a, nid) for a, nid in parts] for t, parts in o.get("blocks", {}).items()},
                                       _at(o["loc"].get("at") if isinstance(o["loc"], dict) else None), o.get("note", ""),
                                       o.get("description") or {}, o.get("tokenizer", ""))
    plan.history = [tuple(h) for h in data.get("history", [])]
    return plan


def to_dot(plan: Plan) -> str:
    order = node_order(plan)
    num = {nid: i for i, nid in enumerate(order)}
    lines = ["digraph plan {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
    for nid in order:
        n = plan.nodes[nid]
        label = f"%{num[nid]} {n.op}"
        if n.op == "load":
            label += f"\\n{n.param('source')}:{n.param('tensor')}"
        lines.append(f'  n{num[nid]} [label="{label}"];')
        for i in n.inputs:
            lines.append(f"  n{num[i]} -> n{num[nid]};")
    lines.append("}")
    return "\n".join(lines) + "\n"
