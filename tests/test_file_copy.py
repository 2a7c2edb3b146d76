"""Tensors copied unchanged go file to file (runtime/runner.py `_copy`, runtime/sinks.py
`copy_spans`): the byte ranges a copy unit hands the sink are the input tensors' own
bytes, and every output is byte-identical to the path that copies through memory
(`FUSIONLANG_FILE_COPY=0`), with `os.copy_file_range` and without it.
"""

from __future__ import annotations

import os

import torch
from conftest import load_state, run_cli, write_spec

import fusionlang
from fusionlang.runtime.reader import FileSpans, TensorReader
from fusionlang.runtime.runner import Runner
from fusionlang.runtime.units import plan_phases

MERGES = {"m": """linear(experts, weights=[0.5, 0.5]) {
    "model.layers.1.*" => experts[1]
    "*norm*" => base
}""", "mx": 'moe(base, experts, gate_mode="random", layout="fused")'}


def _spec(tmp_path, fam, out: str, names=tuple(MERGES)):
    return write_spec(tmp_path, f'''use merging
model base = local("{fam['base']}")
models experts = [local("{fam['e0']}"), local("{fam['e1']}")]
''' + "".join(f'merge {n} = {MERGES[n]}\nsave {n} to "{out}/{n}"\n' for n in names), f"{out}.fuse")


def _copies(plan) -> dict[str, bytes]:
    """Output tensor -> the bytes of the file ranges its copy unit hands the sink."""
    cpu = torch.device("cpu")
    runner = Runner(plan, cpu, TensorReader(plan, cpu))
    out = {}
    for phase in plan_phases(plan):
        for unit in phase.units:
            if any(plan.sources[src].stage for src, _, _ in unit.loads(plan)):
                continue  # the routers: computed by the run's model stage
            for nid, value, _ in runner.run(unit, {}, {}):
                if isinstance(value, FileSpans):
                    (_, tensor, _), = unit.writes[nid]
                    out[tensor] = b"".join(_read(path, start, n) for path, start, n in value.spans)
                    assert value.nbytes == len(out[tensor]) == torch.Size(plan.nodes[nid].shape).numel() * 4
    return out


def _read(path: str, start: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(n)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_copy_units_hand_the_sink_the_input_byte_ranges(llama, tmp_path):
    base, e0, e1 = (load_state(llama[k]) for k in ("base", "e0", "e1"))
    copies = _copies(fusionlang.compile(_spec(tmp_path, llama, "m", ["m"])))
    want = {k: e1[k] for k in e1 if k.startswith("model.layers.1.")}
    want.update({k: base[k] for k in base if "norm" in k and k not in want})
    assert copies.keys() == want.keys()
    for k, v in want.items():
        assert copies[k] == _bytes(v), k
    copies = _copies(fusionlang.compile(_spec(tmp_path, llama, "mx", ["mx"])))
    n_layers = 4
    assert len(copies) == 3 + n_layers * 8  # embeddings, head, final norm; attention, norms, fused experts
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = torch.stack([torch.cat([e[p + "gate_proj.weight"], e[p + "up_proj.weight"]]) for e in (e0, e1)])
        assert copies[p + "experts.gate_up_proj"] == _bytes(gate_up)
        assert copies[p + "experts.down_proj"] == _bytes(torch.stack([e[p + "down_proj.weight"] for e in (e0, e1)]))
        assert copies[f"model.layers.{i}.self_attn.q_proj.weight"] == _bytes(base[f"model.layers.{i}.self_attn.q_proj.weight"])


def test_file_copies_equal_memory_copies_with_and_without_copy_file_range(llama, tmp_path, monkeypatch):
    rc, _, err = run_cli("run", str(_spec(tmp_path, llama, "files")), "-q")
    assert rc == 0, err
    monkeypatch.setenv("FUSIONLANG_FILE_COPY", "0")
    rc, _, err = run_cli("run", str(_spec(tmp_path, llama, "memory")), "-q")
    assert rc == 0, err
    monkeypatch.delenv("FUSIONLANG_FILE_COPY")
    if hasattr(os, "copy_file_range"):
        monkeypatch.delattr(os, "copy_file_range")  # the read/write fallback (other systems, EXDEV)
    rc, _, err = run_cli("run", str(_spec(tmp_path, llama, "chunks")), "-q")
    assert rc == 0, err
    for name in ("m", "mx"):
        files = sorted(p.name for p in (tmp_path / "memory" / name).iterdir() if p.name != "README.md")  # names its spec
        for other in ("files", "chunks"):
            assert sorted(p.name for p in (tmp_path / other / name).iterdir() if p.name != "README.md") == files
            for f in files:
                assert (tmp_path / other / name / f).read_bytes() == (tmp_path / "memory" / name / f).read_bytes(), (
                    other, name, f)
    m, e1, base = load_state(tmp_path / "files" / "m"), load_state(llama["e1"]), load_state(llama["base"])
    for k, v in m.items():
        if k.startswith("model.layers.1."):  # the first rule that matches
            assert torch.equal(v, e1[k]), k
        elif "norm" in k:
            assert torch.equal(v, base[k]), k


def test_row_blocks_of_a_copied_tensor_land_at_their_rows(llama, tmp_path):
    """A plan split into row blocks (the split pass, tiny blocks): each block of a copied
    tensor is its own file range, written at its first row."""
    from fusionlang.lang.checker import check_file
    from fusionlang.passes import cse, dce, fold, schedule
    from fusionlang.passes.split import split
    from fusionlang.plan.lower import Lowerer
    from fusionlang.runtime.scheduler import run_plan

    spec = write_spec(tmp_path, f'''use merging
model base = local("{llama['base']}")
models experts = [local("{llama['e0']}"), local("{llama['e1']}")]
merge m = linear(experts, weights=[0.5, 0.5]) {{
    "model.embed_tokens.weight" => experts[1]
    "lm_head.weight" => base
}}
save m to "blocks"
''')
    plan = split(dce(cse(fold(Lowerer(check_file(str(spec))).lower()))), block_elements=200)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(plan.outputs["m"].blocks)
    run_plan(schedule(plan), "cpu")
    out = load_state(tmp_path / "blocks")
    assert torch.equal(out["model.embed_tokens.weight"], load_state(llama["e1"])["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], load_state(llama["base"])["lm_head.weight"])


def test_an_input_that_cannot_be_read_is_e011_naming_the_file(tmp_path):
    import pytest

    from fusionlang.runtime.errors import RunError
    from fusionlang.runtime.sinks import copy_spans

    src = tmp_path / "in.bin"
    src.write_bytes(bytes(range(256)) * 4)
    dst = os.open(tmp_path / "out.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        copy_spans([(str(src), 1000, 24), (str(src), 16, 8)], dst, 0)
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()[1000:1024] + src.read_bytes()[16:24]
        with pytest.raises(RunError) as e:
            copy_spans([(str(src), 1000, 100)], dst, 0)
        assert e.value.code == "E011" and f"cannot read '{src}': it ends before byte 1100" in e.value.message
        with pytest.raises(RunError) as e:
            copy_spans([(str(tmp_path / "gone.bin"), 0, 8)], dst, 0)
        assert e.value.code == "E011" and "gone.bin" in e.value.message
    finally:
        os.close(dst)
