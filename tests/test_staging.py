"""Reading ahead (runtime/staging.py): the inputs of the next units read on a background
thread give the same bytes as reads on the compute thread, within any budget; a unit's
leftovers are dropped; a read error is raised where the runner takes the tensor, as a
direct read's. On the CPU the stager runs when asked (FUSIONLANG_STAGE_AHEAD=1), the
same code as on a GPU but for the pinned copy and the transfer stream (tests/test_gpu.py
runs a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_state, write_spec

from fusionlang.pipeline import compile_spec
from fusionlang.runtime import staging
from fusionlang.runtime.reader import TensorReader
from fusionlang.runtime.scheduler import run_plan
from fusionlang.runtime.units import plan_phases

MERGES = ('ta = task_arithmetic(base, experts, scale=0.4)', 'ti = ties(base, experts, density=0.3)',
          'da = dare(base, experts, density=0.5, seed=3)', 'sl = slerp(experts[0], experts[1], t=0.3)')


def _spec(tmp_path, fam, out: str):
    body = "".join(f"merge {m}\nsave {m.split()[0]} to \"{out}/{m.split()[0]}\"\n" for m in MERGES)
    return write_spec(tmp_path, f'''use merging
model base = local("{fam['base']}")
models experts = [local("{fam['e0']}"), local("{fam['e1']}")]
''' + body, f"{out}.fuse")


def _run(plan, monkeypatch, **env):
    """Run `plan` (or compile a spec first) on the CPU, untiled, with `env` (None: unset)."""
    for k, v in {"FUSIONLANG_STAGE_AHEAD": None, "FUSIONLANG_NO_TILE": "1", **env}.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    return run_plan(plan if not isinstance(plan, Path) else compile_spec(str(plan))[2], "cpu", progress=None)


def _same_outputs(a, b):
    for m in MERGES:
        name = m.split()[0]
        x, y = load_state(a / name), load_state(b / name)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)), (name, k)


def test_inputs_read_ahead_give_the_same_bytes_within_any_budget(llama, tmp_path, monkeypatch):
    direct = _run(_spec(tmp_path, llama, "direct"), monkeypatch)
    assert direct.staged == 0
    ahead = _run(_spec(tmp_path, llama, "ahead"), monkeypatch, FUSIONLANG_STAGE_AHEAD="1")
    plan = compile_spec(str(_spec(tmp_path, llama, "ahead")))[2]
    loads = sum(len(u.loads(plan)) for p in plan_phases(plan) for u in p.units)
    assert 0 < ahead.staged <= loads
    _same_outputs(tmp_path / "direct", tmp_path / "ahead")
    # a budget below one unit: units are staged one at a time (one is always admitted),
    # so the stager never holds more than the largest unit's inputs
    monkeypatch.setattr(staging, "MAX_STAGED_BYTES", 1)
    tight = _run(_spec(tmp_path, llama, "tight"), monkeypatch, FUSIONLANG_STAGE_AHEAD="1")
    largest = max(sum(4 * torch.Size(plan.sources[s].tensors[t][1]).numel() for s, t, _ in u.loads(plan))
                  for p in plan_phases(plan) for u in p.units)
    assert tight.staged == ahead.staged and 0 < tight.staged_peak <= largest
    _same_outputs(tmp_path / "direct", tmp_path / "tight")


def test_the_stager_hands_out_tensors_in_any_order_and_drops_a_finished_units_leftovers(llama, tmp_path):
    plan = compile_spec(str(_spec(tmp_path, llama, "unit")))[2]
    cpu = torch.device("cpu")
    reader = TensorReader(plan, cpu)
    units = [u for p in plan_phases(plan) for u in p.units if len(u.loads(plan)) >= 2][:3]
    stager = staging.Stager(reader, cpu, budget=1 << 40)
    try:
        for i, u in enumerate(units):
            stager.ahead(i, u.loads(plan))
        first, second = units[0].loads(plan)[:2]
        # taken in another order than staged; each the float32 tensor a direct read gives
        for key in (second, first):
            assert torch.equal(stager.take(key), reader.load_direct(*key))
        stager.finish(0)
        stager.finish(1)  # unit 1 never read: its entries are dropped
        for key in units[2].loads(plan):
            assert torch.equal(stager.take(key), reader.load_direct(*key))
        stager.finish(2)
        assert stager.take(("nope", "nope", None)) is None
        with stager._cv:  # everything taken or dropped: nothing held
            assert stager._held == 0 and not any(stager._ready.values())
    finally:
        stager.close()


def test_a_read_error_is_raised_where_the_tensor_is_taken(llama, tmp_path, monkeypatch):
    import shutil

    from fusionlang.runtime.errors import RunError

    fam = {k: tmp_path / k for k in ("base", "e0", "e1")}
    for k, path in fam.items():
        shutil.copytree(llama[k], path)
    shard = max(fam["e1"].glob("*.safetensors"))
    errors = {}
    for mode in ("0", "1"):
        plan = compile_spec(str(_spec(tmp_path, fam, "out")))[2]
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])  # the tensors' bytes cut off after compile
        try:
            with pytest.raises(RunError) as e:
                _run(plan, monkeypatch, FUSIONLANG_STAGE_AHEAD=mode)
        finally:
            shard.write_bytes(data)
        assert e.value.code == "E011" and str(shard) in e.value.message
        assert not (tmp_path / "out").exists()
        errors[mode] = (e.value.message, e.value.hint, e.value.at)
    assert errors["1"] == errors["0"]
