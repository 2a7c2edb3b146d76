"""The Ray executor (`fusionlang run --executor ray`) on a local Ray instance started by
these tests (`ray.init(num_cpus=2)`): the same bytes as the local executor for every
kind of plan (tiled pointwise units, row blocks sharing an exported statistic, model-wide
reduces across phases, seeded random masks, slices, model stages), the same located
errors with nothing left behind, a killed worker's task retried, and clear errors for an
unreachable cluster."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import ray
import torch
from conftest import make_causal_family, make_family, run_cli, write_spec
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray instance for this module (the runs join it: `connect` reuses it)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A Llama family whose embedding and head (33000 × 128 = 4.2M entries) exceed the
    split pass's block (4M): they are computed in row blocks that share per-tensor
    statistics exported by one unit to the others."""
    root = tmp_path_factory.mktemp("rayfam")
    return root, make_family(root, "llama", n_experts=2, vocab_size=33000, hidden_size=128, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


SPEC = '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
merge t = ties(base, experts, density=0.3)
merge g = ties(base, experts, density=0.3, scope="model", merge="sum", scale=0.3)
merge d = dare(base, experts, density=0.5, consensus=true, seed=7)
merge o = opcm(base, experts, alpha=0.5)
merge s = slerp(experts[0], experts[1], t=[0.0, 0.5, 1.0])
merge p = slices([layers(base, 0, 2), layers(experts[0], 1, 2)])
merge v = task_singular_vector(base, experts)
save t to "OUT/t"
save g to "OUT/g" as bf16
save d to "OUT/d"
save o to "OUT/o"
save s to "OUT/s" as fp16
save p to "OUT/p"
save v to "OUT/v"
'''


def _files(d: Path) -> dict[str, bytes]:
    """Every file of an output but its README (which quotes the spec, whose paths differ)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != "README.md"}


def _run(root: Path, name: str, *args: str) -> tuple[int, str]:
    spec = write_spec(root, SPEC.replace("OUT", name), f"{name}.fuse")
    rc, out, err = run_cli("run", str(spec), *args)
    return rc, out + err


def _local(root: Path) -> Path:
    """The local executor's outputs of SPEC (made once per module)."""
    if not (root / "local" / "t").exists():
        rc, text = _run(root, "local")
        assert rc == 0, text
    return root / "local"


def test_every_kind_of_unit_gives_the_local_bytes(local_ray, fam):
    root, _ = fam
    _local(root)
    rc, text = _run(root, "ray", "--executor", "ray")
    assert rc == 0, text
    # the plan really has what the test is about: row blocks with exports, reduces in later phases
    from fusionlang.pipeline import compile_spec
    from fusionlang.runtime.units import plan_phases

    phases = plan_phases(compile_spec(str(root / "ray.fuse"))[2])
    assert len(phases) >= 2 and any(p.reduces for p in phases)
    assert any(u.exports for p in phases for u in p.units)
    for out in ("t", "g", "d", "o", "s", "p", "v"):
        local, remote = _files(root / "local" / out), _files(root / "ray" / out)
        assert local.keys() == remote.keys() and local, out
        for name in local:
            assert local[name] == remote[name], f"{out}/{name} differs"


def test_a_killed_worker_is_retried_and_the_output_is_the_same(local_ray, fam, monkeypatch):
    root, _ = fam
    _local(root)
    marker = root / "crash-once"
    marker.write_text("")
    monkeypatch.setenv("FUSIONLANG_RAY_CRASH_ONCE", str(marker))  # forwarded to the workers: one exits
    rc, text = _run(root, "retried", "--executor", "ray")
    assert rc == 0, text
    assert not marker.exists()  # a worker did die (it removes the marker before exiting)
    for out in ("t", "d", "o"):
        assert _files(root / "local" / out) == _files(root / "retried" / out)


def test_a_nonfinite_input_is_the_same_located_error_and_nothing_is_written(local_ray, fam, tmp_path):
    _, models = fam
    bad = tmp_path / "bad"
    shutil.copytree(models["e1"], bad)
    from safetensors.torch import load_file

    state = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    text = f'''use merging
model base = local("{models['base']}")
models experts = [local("{models['e0']}"), local("{bad}")]
merge t = ties(base, experts, density=0.3)
save t to "out/t"
'''
    spec = write_spec(tmp_path, text)
    results = [run_cli("run", str(spec), *extra) for extra in ((), ("--executor", "ray"))]
    assert results[0][0] == results[1][0] == 1
    # the diagnostics, without the progress lines of what was written before the failure
    local, remote = ("\n".join(line for line in err.splitlines() if not line.startswith("merging "))
                     for _, _, err in results)
    assert "E031" in remote and name in remote and f"{spec}:3:" in remote, remote  # at the bad model's source call
    assert local == remote, (local, remote)
    assert "Traceback" not in remote and "Unhandled error" not in results[1][2]
    assert not (tmp_path / "out").exists()


def test_model_stages_run_as_tasks_with_the_local_results(local_ray, tmp_path, monkeypatch):
    fam = make_causal_family(tmp_path, n_experts=2, rows=24, seed=5)
    body = f'''use merging
model base = local("{fam['base']}")
models experts = [local("{fam['e0']}"), local("{fam['e1']}")]
data d = dataset("{fam['lm']}", text="text", n=16)
merge rm = regmean(experts, [d, d], batch_size=4)
merge w = wanda(experts[0], d, sparsity_ratio=0.5)
save rm to "OUT/rm"
save w to "OUT/w"
'''
    outs = {}
    # NOTE: a forward pass's float32 sums split over threads: a stage is the same bytes at
    # the same thread count. The three stages share this 2-CPU instance one thread each,
    # so the local run computes them with one thread too (docs/cluster.md).
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in (("local", ()), ("ray", ("--executor", "ray"))):
            monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / f"cache-{name}"))  # each computes its stages
            spec = write_spec(tmp_path, body.replace("OUT", name), f"{name}.fuse")
            rc, _, err = run_cli("run", str(spec), *extra)
            assert rc == 0, err
            outs[name] = err
            assert list((tmp_path / f"cache-{name}" / "stages").glob("*.safetensors"))
    finally:
        torch.set_num_threads(old_threads)
    assert "model stages as Ray tasks" in outs["ray"]
    for o in ("rm", "w"):
        assert _files(tmp_path / "local" / o) == _files(tmp_path / "ray" / o), o


def test_an_unreachable_cluster_is_a_clear_error_at_once(tmp_path, fam):
    root, _ = fam
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = write_spec(root, SPEC.replace("OUT", "never"), "never.fuse")
    t0 = time.perf_counter()
    rc, _, err = run_cli("run", str(spec), "--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert rc == 1 and "E032" in err and f"127.0.0.1:{port}" in err and "<command line>:1:1" in err, err
    assert "Traceback" not in err and time.perf_counter() - t0 < 30
    assert not (root / "never").exists()
    rc, _, err = run_cli("run", str(spec), "--address", f"127.0.0.1:{port}")
    assert rc == 1 and "E006" in err and "--executor ray" in err


def test_the_cli_runs_ray_in_a_fresh_process(fam, tmp_path):
    """As a user runs it: a new process that starts (and stops) its own local instance."""
    import subprocess
    import sys

    root, _ = fam
    spec = write_spec(root, SPEC.replace("OUT", "fresh"), "fresh.fuse")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "fusionlang", "run", str(spec), "--executor", "ray"], check=False,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "fresh.fuse: 164/164 written (100%)" in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert _files(_local(root) / "t") == _files(root / "fresh" / "t")


def test_the_python_api_runs_on_ray(local_ray, fam):
    import fusionlang

    root, _ = fam
    _local(root)
    spec = write_spec(root, SPEC.replace("OUT", "api"), "api.fuse")
    result = fusionlang.run(spec, executor="ray", progress=False)
    assert set(result.outputs) == {"t", "g", "d", "o", "s", "p", "v"}
    for out in ("t", "g", "o", "v"):
        assert _files(root / "local" / out) == _files(root / "api" / out)
    for bad in ({"executor": "dask"}, {"address": "localhost:6379"}):
        with pytest.raises(fusionlang.FuseErrors) as e:
            fusionlang.run(spec, progress=False, **bad)
        assert e.value.diagnostics[0].code == "E006"
