"""Passes: optimized and unoptimized plans give the same tensors; each pass does its job."""

from __future__ import annotations

import torch
from conftest import load_state, run_cli, write_spec

from fusionlang.lang.checker import check_file
from fusionlang.passes import PASSES, run_passes
from fusionlang.plan.lower import Lowerer
from fusionlang.runtime import runner
from fusionlang.runtime.scheduler import run_plan

SPEC = '''use merging
model base = local("{base}")
models experts = [local("{e0}"), local("{e1}"), local("{e2}")]
merge ta = task_arithmetic(base, experts, scale=0.3)
merge t = ties(base, experts, density=0.4) {{
    "*norm.weight" => base * 1.0
    "layers.{{i}}.mlp.*" => ties(base, experts, density=ramp(0.6, 0.2), scale=1.0)
}}
merge fb = ties(base, experts, density=0.3, scale=0.3, merge="sum", scope="model")
merge d = dare(base, experts, density=0.6, consensus=true, seed=9)
merge dead = mean(experts)
save ta to "{out}/ta"
save t to "{out}/t"
save fb to "{out}/fb" as bf16
save d to "{out}/d"
'''


def _plan(spec, passes):
    prog = check_file(str(spec))
    plan = Lowerer(prog).lower()
    return plan, run_passes(plan, passes, verify=True)


def test_optimized_equals_unoptimized(llama, tmp_path):
    fam = {k: str(v) for k, v in llama.items()}
    results = {}
    for label, passes in (("none", set()), ("all", None)):
        spec = write_spec(tmp_path, SPEC.format(**fam, out=f"out_{label}"), f"{label}.fuse")
        lowered, plan = _plan(spec, passes)
        run_plan(plan, "cpu")
        results[label] = (lowered, plan)
    for name in ("ta", "t", "fb", "d"):
        a, b = load_state(tmp_path / f"out_none/{name}"), load_state(tmp_path / f"out_all/{name}")
        for k in a:
            assert (a[k].float() - b[k].float()).abs().max() <= 1e-6, (name, k)
    assert len(results["all"][1].nodes) < len(results["none"][1].nodes)


def test_each_pass(llama, tmp_path):
    fam = {k: str(v) for k, v in llama.items()}
    spec = write_spec(tmp_path, SPEC.format(**fam, out="out"))
    lowered, plan = _plan(spec, None)
    hist = dict(plan.history)
    assert [n for n, _ in plan.history] == ["lower"] + [n for n, _ in PASSES]
    ops_lowered = lowered.count_ops()
    ops = plan.count_ops()
    # fold: scale(x, 1.0) disappears, add + scale fuse into axpy
    assert ops.get("axpy", 0) > 0 and ops_lowered.get("axpy", 0) == 0
    assert all(not (n.op == "scale" and n.param("k") == 1.0) for n in plan.nodes.values())
    # the unsaved `dead` merge (mean over experts) is never lowered; dce removes the
    # nodes that fusion orphaned (the scale nodes folded into axpy)
    assert "mean" not in ops_lowered and "mean" not in ops
    assert hist["dce"] < hist["cse"]
    live = set(plan.order)
    assert all(nid in live for nid in plan.nodes)
    # hash-consing: every input tensor is loaded exactly once across the four merges
    loads = [n for n in plan.nodes.values() if n.op == "load"]
    n_tensors = len(plan.sources["base"].tensors)
    assert len(loads) == 4 * n_tensors
    # schedule: three phases for the model-wide TIES; order is a topological order
    assert max(plan.phase_of.values()) == 2
    pos = {nid: i for i, nid in enumerate(plan.order)}
    assert all(pos[i] < pos[nid] for nid, n in plan.nodes.items() for i in n.inputs)


def test_dump_after_and_emit(llama, tmp_path):
    fam = {k: str(v) for k, v in llama.items()}
    spec = write_spec(tmp_path, SPEC.format(**fam, out="out"))
    rc, out, err = run_cli("compile", str(spec), "--dump-after", "fold", "-q")
    assert rc == 0, err
    assert out.startswith("# --- after fold") and "axpy(" in out
    rc, out, err = run_cli("compile", str(spec), "--emit", "dot", "-q")
    assert rc == 0 and out.startswith("digraph plan {")
    rc, out, err = run_cli("compile", str(spec))
    assert rc == 0
    assert "lowered ->" in err and "bytes read" in err and "est. peak memory" in err


def test_saved_json_plan_runs_identically(llama, tmp_path):
    fam = {k: str(v) for k, v in llama.items()}
    spec = write_spec(tmp_path, SPEC.format(**fam, out="out"))
    rc, _, err = run_cli("compile", str(spec), "--emit", "json", "-o", str(tmp_path / "plan.json"), "-q")
    assert rc == 0, err
    rc, _, err = run_cli("run", str(tmp_path / "plan.json"), "-q")
    assert rc == 0, err
    first = load_state(tmp_path / "out/d")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    again = load_state(tmp_path / "out/d")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_row_split_gives_identical_results(llama, tmp_path):
    """Large row-wise tensors are computed in row blocks: bit-identical to whole tensors."""
    from fusionlang.passes import cse, dce, fold, schedule
    from fusionlang.passes.split import split
    from fusionlang.plan import emit

    fam = {k: str(v) for k, v in llama.items()}
    text = '''use merging
model base = local("{base}")
models experts = [local("{e0}"), local("{e1}"), local("{e2}")]
merge ta = task_arithmetic(base, experts, scale=0.3)
merge t = ties(base, experts, density=0.4)
merge d = dare(base, experts, density=0.5, consensus=true, rescale="l1", seed=3)
merge d2 = dare(base, experts, density=0.6, seed=1)
save ta to "{out}/ta" as bf16
save t to "{out}/t"
save d to "{out}/d"
save d2 to "{out}/d2"
'''
    outs = {}
    for label, block in (("whole", None), ("split", 200)):
        spec = write_spec(tmp_path, text.format(**fam, out=label), f"{label}.fuse")
        plan = Lowerer(check_file(str(spec))).lower()
        plan = dce(cse(fold(plan)))
        if block:
            plan = split(plan, block_elements=block)
            blocked = plan.outputs["ta"].blocks
            assert "model.embed_tokens.weight" in blocked and len(blocked["model.embed_tokens.weight"]) > 1
            # TIES too: its per-tensor top-k threshold is computed once and shared by the blocks
            assert "model.embed_tokens.weight" in plan.outputs["t"].blocks
            assert "model.embed_tokens.weight" in plan.outputs["d"].blocks  # DARE masks are split-invariant
            plan = emit.from_json(emit.to_json(schedule(plan)))  # blocks survive a saved plan
        else:
            plan = schedule(plan)
        run_plan(plan, "cpu")
        outs[label] = {n: load_state(tmp_path / label / n) for n in ("ta", "t", "d", "d2")}
    for n in ("ta", "t", "d", "d2"):
        for k, v in outs["whole"][n].items():
            assert torch.equal(v, outs["split"][n][k]), (n, k)


def test_tiled_execution_gives_identical_results(llama, tmp_path, monkeypatch):
    """Pointwise groups run in cache-sized tiles on the CPU: bit-identical to whole tensors.
    The tile is shrunk so that the tiny test tensors are cut into many tiles. TIES groups
    tile once their top-k statistics are separate groups (row-split plans); DARE's L1
    statistic is summed tile by tile, so a DARE merge tiles either way."""
    from fusionlang.ops import sparsify
    from fusionlang.passes import cse, dce, fold, schedule
    from fusionlang.passes.split import split

    fam = {k: str(v) for k, v in llama.items()}
    text = '''use merging
model base = local("{base}")
models experts = [local("{e0}"), local("{e1}"), local("{e2}")]
merge ta = task_arithmetic(base, experts, scale=0.3)
merge soup = linear(experts, weights=[1, 2, 3])
merge t = ties(base, experts, density=0.4)
merge d = dare(base, experts, density=0.5, consensus=true, rescale="l1", seed=3)
save ta to "{out}/ta" as bf16
save soup to "{out}/soup"
save t to "{out}/t"
save d to "{out}/d" as fp16
'''
    dare_only = '''use merging
model base = local("{base}")
models experts = [local("{e0}"), local("{e1}"), local("{e2}")]
merge d = dare(base, experts, density=0.3, consensus=true, rescale="l1", seed=5)
save d to "{out}/d" as bf16
'''
    specs = {"mixed": (text, ("ta", "soup", "t", "d")), "dare": (dare_only, ("d",))}
    tiled_groups = []
    real = runner.Runner._run_tiled

    def spy(self, nodes, targets, *a):
        tiled_groups.append({self.plan.nodes[n].op for n in nodes})
        return real(self, nodes, targets, *a)

    monkeypatch.setattr(runner.Runner, "_run_tiled", spy)
    monkeypatch.setattr(runner, "TILE", 100)
    monkeypatch.setattr(sparsify, "STAT_CHUNK", 50)
    for spec_name, (spec_text, names) in specs.items():
        outs = {}
        for label in ("whole", "tiled", "whole-split", "tiled-split"):
            if label.startswith("whole"):
                monkeypatch.setenv("FUSIONLANG_NO_TILE", "1")
            else:
                monkeypatch.delenv("FUSIONLANG_NO_TILE", raising=False)
            out = f"{spec_name}-{label}"
            spec = write_spec(tmp_path, spec_text.format(**fam, out=out), f"{out}.fuse")
            plan = dce(cse(fold(Lowerer(check_file(str(spec))).lower())))
            if label.endswith("split"):
                plan = split(plan, block_elements=1000)
            run_plan(schedule(plan), "cpu")
            outs[label] = {n: load_state(tmp_path / out / n) for n in names}
        for a, b in (("whole", "tiled"), ("whole", "whole-split"), ("whole", "tiled-split")):
            for n in names:
                assert outs[a][n].keys() == outs[b][n].keys()
                for k, v in outs[a][n].items():
                    assert v.dtype == outs[b][n][k].dtype and torch.equal(v, outs[b][n][k]), (spec_name, a, b, n, k)
    assert any("axpy" in ops or "add" in ops for ops in tiled_groups)  # task arithmetic tiled
    assert any("disjoint_merge" in ops for ops in tiled_groups)  # so was a TIES merge step
    assert any("drop_rows" in ops for ops in tiled_groups)  # and DARE's
    assert any({"drop_l1_factor", "drop_rows"} <= ops for ops in tiled_groups)  # statistic and merge in one group


def test_dare_masks_are_the_documented_draw():
    """DARE's keep-mask for chunk j is the documented draw: the 16-bit little-endian words
    of SFC64(tensor_seed(seed, j))'s raw outputs, kept iff below round(density * 65536).
    Any slice of a tensor's mask equals the mask drawn for that slice alone."""
    import numpy as np

    from fusionlang.ops import sparsify

    n = sparsify._MASK_CHUNK
    for seed, j, density in ((0, 0, 0.5), (7, 3, 0.1), (123456789, 11, 1 / 3), (2**40 + 5, 1, 0.9)):
        mask = sparsify._mask_chunk(j, density, seed).copy()
        raw = np.random.SFC64(sparsify.tensor_seed(seed, str(j))).random_raw(n // 4)
        words = np.frombuffer(raw.astype("<u8").tobytes(), dtype="<u2")
        assert np.array_equal(mask, words < round(density * 65536)), (seed, j, density)
        sd = (density * (1 - density) / n) ** 0.5
        assert abs(mask.mean() - density) < 5 * sd
    whole = sparsify.keep_mask_float(0, 3 * n, 0.3, 5, torch.empty(3 * n))
    for a, b in ((0, 10), (n - 7, n + 9), (n + 1, 3 * n)):
        part = sparsify.keep_mask_float(a, b - a, 0.3, 5, torch.empty(b - a))
        assert torch.equal(part, whole[a:b]), (a, b)


def test_l1_factor_is_the_same_whole_or_tiled():
    """The L1 rescale factor summed tile by tile (any tile start at a multiple of
    STAT_CHUNK) has exactly the bits of the whole-tensor value, and equals the factor
    computed in float64 from the mask to float precision."""
    from fusionlang.ops import sparsify

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5 * sparsify.STAT_CHUNK + 123, generator=g)
    whole = sparsify.drop_l1_factor(x, 0.4, 9)
    tile = 2 * sparsify.STAT_CHUNK
    parts = [sparsify._l1_partials(x[s:s + tile], s, 0.4, 9) for s in range(0, x.numel(), tile)]
    assert sparsify._l1_finish(parts, 0.4, 9).item() == whole.item()
    mask = sparsify.keep_mask_float(0, x.numel(), 0.4, 9, torch.empty(x.numel()))
    ref = x.double().abs().sum() / (x.double() * mask.double()).abs().sum()
    assert abs(whole.item() - ref.item()) < 1e-6 * ref.item()


def test_tiled_integer_buffer_passes_through(llama, tmp_path, monkeypatch):
    """An int64 buffer (e.g. position_ids) bigger than a tile goes through a tiled merge
    unchanged, as it does untiled."""
    import shutil

    from safetensors.torch import load_file, save_file

    fam = {}
    for k in ("base", "e0", "e1", "e2"):
        d = shutil.copytree(llama[k], tmp_path / "models" / k)
        sd = load_file(d / "model.safetensors")
        sd["extra.position_ids"] = torch.arange(300, dtype=torch.int64).reshape(1, 300)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        fam[k] = str(d)
    monkeypatch.setattr(runner, "TILE", 100)
    spec = write_spec(tmp_path, '''use merging
model base = local("{base}")
models experts = [local("{e0}"), local("{e1}"), local("{e2}")]
merge ta = task_arithmetic(base, experts, scale=0.3)
save ta to "out/ta"
'''.format(**fam))
    rc, _, err = run_cli("run", str(spec), "-q", "--device", "cpu")
    assert rc == 0, err
    got = load_state(tmp_path / "out/ta")["extra.position_ids"]
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(300).reshape(1, 300))
