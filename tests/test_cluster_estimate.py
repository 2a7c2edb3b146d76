"""`compile --estimate-cluster N` (fusionlang/plan/cluster.py) against independent
computations on real tiny models: bytes read against the safetensors files (read with
safetensors' own reader) and against what the local executor reads, output bytes
against the files a run writes, the statistics' sizes against the ops' real outputs,
the LPT assignment's bounds, one worker against the one-machine line, time monotone in
every bandwidth, and the command line's table and its located errors."""

from __future__ import annotations

import math
import re
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import make_classifier_family, make_family, run_cli, write_spec
from safetensors import safe_open

import fusionlang
from fusionlang.plan.cluster import (
    GB,
    TASK_BASE_MEMORY,
    UNSHAPED_VALUE_BYTES,
    estimate_cluster,
    human_duration,
    unit_costs,
    unit_memory,
)
from fusionlang.runtime.units import plan_phases

# hidden 32 x vocab 131200 = 4.2M elements: the embedding and the head are computed in
# two row blocks (passes/split.py, 4M elements), so loads of row blocks are counted too
VOCAB = 131_200


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    make_family(root, "llama", n_experts=3, dtype=torch.bfloat16, vocab_size=VOCAB, seed=5)
    return root


HEAD = 'use merging\n\nmodel base = local("base")\nmodels experts = [local("e0"), local("e1"), local("e2")]\n\n'
TA = HEAD + 'merge ta = task_arithmetic(base, experts, scale=0.3)\n\nsave ta to "out/ta"\nsave ta to "out/ta32" as fp32\n'
TA_TWICE = HEAD + 'merge ta = task_arithmetic(base, experts, scale=0.3)\n\nsave ta to "out/a"\nsave ta to "out/b"\n'
TIES_MODEL = HEAD + ('merge t = ties(base, experts, density=0.2, scope="model")\n\n'
                     'save t to "out/t"\n')


def file_bytes(model_dir: Path) -> int:
    """Bytes of every tensor in a model directory, read with safetensors' own reader."""
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (a safe_open handle, not a dict: it has no __iter__)
                total += st.get_tensor(k).nbytes
    return total


def compiled(fam: Path, text: str, name: str):
    spec = write_spec(fam, text, name)
    return spec, fusionlang.compile(str(spec))


def test_bytes_against_the_files_and_the_executor(fam):
    spec, plan = compiled(fam, TA, "ta.fuse")
    inputs = sum(file_bytes(fam / m) for m in ("base", "e0", "e1", "e2"))
    assert any(plan.nodes[n].param("rows") is not None for n in plan.nodes)  # row blocks are in the plan
    for n in (1, 2, 3, 7):
        est = estimate_cluster(plan, n)
        assert len(est.per_worker) == n and sum(w.units for w in est.per_worker) == est.units
        assert sum(w.read_bytes for w in est.per_worker) == est.read_bytes == inputs
        # each output value goes to the driver once, in its output dtype: bf16 and fp32
        assert sum(w.sent_bytes for w in est.per_worker) == est.sent_bytes == (est.output_bytes if n > 1 else 0)
    result = fusionlang.run(str(spec), device="cpu")
    assert result.bytes_read == inputs
    written = file_bytes(fam / "out" / "ta") + file_bytes(fam / "out" / "ta32")
    assert est.output_bytes == result.bytes_written == written
    assert file_bytes(fam / "out" / "ta32") == 2 * file_bytes(fam / "out" / "ta")
    # one value saved twice in the same dtype: returned once, written twice
    _, twice = compiled(fam, TA_TWICE, "ta_twice.fuse")
    est = estimate_cluster(twice, 3)
    assert est.output_bytes == 2 * est.sent_bytes == 2 * file_bytes(fam / "out" / "ta")


def test_a_three_phase_plan_reads_its_inputs_in_each_phase(fam):
    """FusionBench's TIES: two histogram passes for the model-wide threshold, then the
    merge: every input is read three times, which the executor does too; the histograms
    go to the driver besides the outputs."""
    spec, plan = compiled(fam, TIES_MODEL, "ties_model.fuse")
    inputs = sum(file_bytes(fam / m) for m in ("base", "e0", "e1", "e2"))
    est = estimate_cluster(plan, 4)
    assert est.phases == 3 and est.read_bytes == 3 * inputs
    assert sum(w.read_bytes for w in est.per_worker) == 3 * inputs
    assert fusionlang.run(str(spec), device="cpu").bytes_read == 3 * inputs
    assert est.output_bytes == file_bytes(fam / "out" / "t")
    # each expert's task vector: one high-bits and one low-bits histogram per tensor
    tensors = len(plan.outputs["t"].tensors)
    hi, lo = UNSHAPED_VALUE_BYTES["magnitude_hist_hi"], UNSHAPED_VALUE_BYTES["magnitude_hist_lo"]
    assert est.sent_bytes - est.output_bytes == 3 * tensors * (hi + lo)


def test_statistic_sizes_are_the_ops_real_outputs():
    from fusionlang.ops import OPS

    x = torch.randn(1000)
    hi = OPS["magnitude_hist_hi"].fn(x)
    bucket = OPS["select_bucket"].fn([hi], density=0.2)
    lo = OPS["magnitude_hist_lo"].fn(x, bucket)
    assert UNSHAPED_VALUE_BYTES == {"magnitude_hist_hi": hi.nbytes, "magnitude_hist_lo": lo.nbytes}


def unit_seconds(c, disk, mem) -> float:
    return c.read_bytes / (disk * GB) + c.touched_bytes / (mem * GB)


@pytest.mark.parametrize("spec_text,name", [(TA, "ta.fuse"), (TIES_MODEL, "ties_model.fuse")])
@pytest.mark.parametrize("placement", ["fifo", "lpt"])
def test_placement_bounds(fam, spec_text, name, placement):
    """Per phase, the slowest worker is at least the mean load and the largest unit, and
    at most their sum (Graham's bound for list scheduling, in any order)."""
    _, plan = compiled(fam, spec_text, name)
    costs = unit_costs(plan)
    disk, mem = 2.0, 10.0
    for n in (2, 3, 5):
        est = estimate_cluster(plan, n, disk_gbps=disk, mem_gbps=mem, placement=placement)
        low = high = 0.0
        for p in {c.phase for c in costs}:
            t = [unit_seconds(c, disk, mem) for c in costs if c.phase == p]
            low += max(sum(t) / n, max(t))
            high += sum(t) / n + max(t)
        assert low * (1 - 1e-12) <= est.worker_seconds <= high * (1 + 1e-12)
        busy = sorted(w.busy_seconds for w in est.per_worker)
        assert math.isclose(sum(busy), sum(unit_seconds(c, disk, mem) for c in costs))
    # more workers than units: each phase takes as long as its largest unit
    est = estimate_cluster(plan, len(costs) + 3, disk_gbps=disk, mem_gbps=mem, placement=placement)
    assert math.isclose(est.worker_seconds, sum(max(unit_seconds(c, disk, mem) for c in costs if c.phase == p)
                                                for p in {c.phase for c in costs}))


def test_one_worker_is_the_one_machine_line(fam):
    _, plan = compiled(fam, TIES_MODEL, "ties_model.fuse")
    one = estimate_cluster(plan, 1, disk_gbps=3, net_gbps=1, mem_gbps=7)
    assert estimate_cluster(plan, 4, disk_gbps=3, net_gbps=1, mem_gbps=7).single == one
    assert one.one_machine is one and one.receive_seconds == 0 and one.sent_bytes == 0
    w = one.per_worker[0]
    assert w.units == one.units and w.read_bytes == one.read_bytes
    # the largest unit: phase 1 of the lm_head (or embedding), whole: the base, and the
    # three task vectors with the last expert's load. NOTE: the schedule computes every
    # task vector before the first histogram; interleaving them would hold three.
    assert w.peak_bytes == (3 + 2) * 4 * VOCAB * 32
    costs = unit_costs(plan)
    by_phase = sum(sum(unit_seconds(c, 3, 7) for c in costs if c.phase == p) for p in range(3))
    assert math.isclose(one.seconds, max(by_phase, one.output_bytes / 3e9))
    # two CPUs: one unit at a time computed twice as fast, in the same memory
    two = estimate_cluster(plan, 1, disk_gbps=3, net_gbps=1, mem_gbps=7, slots=2).per_worker[0]
    assert two.peak_bytes == w.peak_bytes and math.isclose(two.compute_seconds, w.compute_seconds / 2)
    assert two.read_seconds == w.read_seconds


def test_worker_and_driver_memory_are_what_the_ray_executor_holds(fam):
    """A worker holds the tasks it runs at once, each with the memory the Ray executor
    asks for it; the driver the results of the tasks it keeps in flight (2 per CPU)."""
    from fusionlang.runtime import ray_scheduler

    _, plan = compiled(fam, TIES_MODEL, "ties_model.fuse")
    for phase in plan_phases(plan):
        for u in phase.units:
            assert unit_memory(plan, u) == ray_scheduler.unit_memory(plan, u) + TASK_BASE_MEMORY
    costs = unit_costs(plan)
    for slots in (1, 2):
        est = estimate_cluster(plan, 3, slots=slots)
        mine = {w: [] for w in range(3)}
        for w, c in _placed(est, costs):
            mine[w].append(c.task_bytes)
        for w in est.per_worker:
            assert w.peak_bytes == sum(sorted(mine[w.index])[-slots:]) > slots * TASK_BASE_MEMORY
        assert est.driver_peak_bytes == sum(sorted(c.sent_bytes for c in costs)[-2 * 3 * slots:])


def _placed(est, costs):
    """(worker, unit) pairs of a fifo estimate, placed again independently: each unit of
    a phase, in order, to the worker whose phase load is least (ties: the lower index)."""
    disk, mem = est.disk_gbps * GB, est.mem_gbps * GB * est.slots
    out = []
    total = [0.0] * est.workers  # over the phases so far: the tie-break
    for p in sorted({c.phase for c in costs}):
        load = [0.0] * est.workers
        for c in (c for c in costs if c.phase == p):
            w = min(range(est.workers), key=lambda i: (load[i], total[i], i))
            t = c.read_bytes / disk + c.touched_bytes / mem
            load[w] += t
            total[w] += t
            out.append((w, c))
    assert [sum(1 for w, _ in out if w == i) for i in range(est.workers)] == [w.units for w in est.per_worker]
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_time_is_monotone_in_every_bandwidth(fam, n):
    _, plan = compiled(fam, TIES_MODEL, "ties_model.fuse")
    base = {"disk_gbps": 1.0, "net_gbps": 1.0, "mem_gbps": 1.0}
    for knob in ("disk_gbps", "net_gbps", "mem_gbps", "storage_gbps"):
        times = [estimate_cluster(plan, n, **(base | {knob: v})).seconds for v in (0.01, 0.1, 1.0, 10.0, 100.0)]
        assert all(a >= b for a, b in pairwise(times)), (knob, times)
    # a bandwidth that is the bottleneck, when raised, makes the merge faster
    slow_net = estimate_cluster(plan, 3, **(base | {"net_gbps": 0.001}))
    assert "network" in slow_net.bottleneck and math.isclose(slow_net.seconds, slow_net.sent_bytes / 1e6)
    assert estimate_cluster(plan, 3, **(base | {"net_gbps": 0.002})).seconds < slow_net.seconds
    slow_storage = estimate_cluster(plan, n, **(base | {"storage_gbps": 0.001}))
    assert "shared storage" in slow_storage.bottleneck
    assert math.isclose(slow_storage.seconds, slow_storage.read_bytes / 1e6)


def test_model_stages_are_tasks_with_their_memory(tmp_path):
    fam = make_classifier_family(tmp_path, n_experts=2, rows=24, seed=3)
    spec = write_spec(tmp_path, 'use merging\nmodels experts = [local("e0"), local("e1")]\n'
                      'data d0 = dataset("data0.jsonl", text="text", n=16, seed=1)\n'
                      'data d1 = dataset("data1.jsonl", text="text", n=16, seed=1)\n'
                      'merge rm = regmean(experts, [d0, d1], batch_size=8)\nsave rm to "out/rm"\n')
    assert fam["e0"].exists()
    plan = fusionlang.compile(str(spec))
    stages = {k: s.stage["estimate"]["peak_bytes"] for k, s in plan.sources.items() if s.stage}
    assert len(stages) == 2 and all(v > 0 for v in stages.values())
    est = estimate_cluster(plan, 2)
    assert {s.key: s.peak_bytes for s in est.stages} == stages
    assert sorted(s.worker for s in est.stages) == [0, 1]  # one each: placed by memory
    for s in est.stages:
        assert est.per_worker[s.worker].peak_bytes >= s.peak_bytes and s.key in est.per_worker[s.worker].stages
    assert estimate_cluster(plan, 1).per_worker[0].peak_bytes >= max(stages.values())


def test_cli_prints_workers_driver_and_one_machine(fam):
    spec, plan = compiled(fam, TA, "ta.fuse")
    rc, out, err = run_cli("compile", str(spec), "-q", "--estimate-cluster", "3", "--disk-gbps", "0.5",
                           "--net-gbps", "0.25", "--mem-gbps", "4")
    assert rc == 0 and out == "", err
    est = estimate_cluster(plan, 3, disk_gbps=0.5, net_gbps=0.25, mem_gbps=4)
    for words in ("worker 0", "worker 1", "worker 2", "driver", "one machine", "Disk 0.5 GB/s, network 0.25 GB/s",
                  f"expected time on 3 workers: {human_duration(est.seconds)} — bottleneck: {est.bottleneck}",
                  f"one machine: {human_duration(est.single.seconds)}"):
        assert words in err, (words, err)
    assert "worker 3" not in err and "median" not in err
    rc, _, err = run_cli("compile", str(spec), "-q", "--estimate-cluster", "12")
    assert rc == 0 and all(f"workers: {w}" in err for w in ("min", "median", "max")) and "worker 0" not in err, err
    # without the flag, nothing of it; with it and without -q, after the plan's summary
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 0 and "cluster estimate" not in err
    rc, _, err = run_cli("compile", str(spec), "--estimate-cluster", "2")
    assert rc == 0 and err.index("plan for") < err.index("cluster estimate: 2 workers"), err


@pytest.mark.parametrize("args,flag", [
    (["--estimate-cluster", "0"], "--estimate-cluster"),
    (["--estimate-cluster", "-3"], "--estimate-cluster"),
    (["--estimate-cluster", "4", "--disk-gbps", "nan"], "--disk-gbps"),
    (["--estimate-cluster", "4", "--net-gbps", "-1"], "--net-gbps"),
    (["--estimate-cluster", "4", "--mem-gbps", "inf"], "--mem-gbps"),
    (["--estimate-cluster", "4", "--mem-gbps", "0"], "--mem-gbps"),
    (["--estimate-cluster", "4", "--storage-gbps", "1e-12"], "--storage-gbps"),
    (["--estimate-cluster", "4", "--slots", "0"], "--slots"),
])
def test_bad_arguments_are_located_errors(fam, args, flag):
    spec = write_spec(fam, TA, "ta.fuse")
    rc, out, err = run_cli("compile", str(spec), "-q", *args)
    assert rc == 1 and "Traceback" not in out + err, err
    assert re.search(rf"<command line>:1:1: error\[E006\]: {flag} must be", err), err
    assert "hint:" in err and "cluster estimate" not in err
