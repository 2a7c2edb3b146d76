"""Alignment in the language: `align(model, to=ref, ...)`, `wasserstein_barycenter(...)`
and the stdlib's `ot_fusion` on the tiny nets zoo and on tiny Llama models, through the
real CLI; located errors for every misuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_locations, load_state, run_cli, tiny_config, write_spec

import fusionlang
from fusionlang.arch import nets as N
from fusionlang.arch.permutation import derive
from fusionlang.stages import align as A
from fusionlang.stages import matching as X


@pytest.fixture(scope="module")
def _nets_cache(tmp_path_factory) -> tuple[Path, Path]:
    from fusionlang.zoo.build import build_zoo
    from fusionlang.zoo.testing import link_packages, require

    require("deb", "dataset-fashion-mnist")
    cache = link_packages(tmp_path_factory.mktemp("netscache"))
    return cache, build_zoo("nets", tiny=True, cache=cache, fetch=False, threads=1)  # a few seconds


@pytest.fixture
def zoo(_nets_cache, monkeypatch) -> Path:
    """The tiny nets zoo, built under a cache of the test module's own."""
    cache, out = _nets_cache
    monkeypatch.setenv("FUSIONLANG_CACHE", str(cache))
    return out


def _images(zoo: Path):
    from fusionlang.zoo.evaluate import find_task, load_task_data

    return load_task_data(find_task("fashion", "nets-tiny")).test.images


def _permuted_copy(src: Path, dst: Path, seed: int) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    st = load_state(src)
    spec = derive(cfg, {k: tuple(v.shape) for k, v in st.items()})
    g = torch.Generator().manual_seed(seed)
    m = N.build(cfg)
    m.load_state_dict(X.apply_maps(spec, st, {p.name: torch.randperm(p.size, generator=g) for p in spec.perms}),
                      strict=False)
    return N.save(m, cfg, dst)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_align_in_a_spec(zoo, tmp_path, arch):
    spec = write_spec(tmp_path, f"""
model a = zoo("nets-tiny", model="{arch}-s0")
model b = zoo("nets-tiny", model="{arch}-s1")
data calib = zoo_data("fashion", zoo="nets-tiny", n=100)
merge wm = align(b, to=a)
merge ot = align(b, to=a, data=calib, method="emd")
merge mid = 0.5 * a + 0.5 * align(b, to=a)
save wm to "out/wm"
save ot to "out/ot"
save mid to "out/mid"
""")
    rc, out, err = run_cli("run", str(spec))
    assert rc == 0, out + err
    a_dir, b_dir = zoo / f"{arch}-s0", zoo / f"{arch}-s1"
    sa, sb = load_state(a_dir), load_state(b_dir)
    cfg = json.loads((a_dir / "config.json").read_text())
    pspec = derive(cfg, {k: tuple(v.shape) for k, v in sa.items()})
    want, maps = A.align_states(pspec, sa, sb, "weight")
    assert any(not torch.equal(m, torch.arange(len(m))) for m in maps.values())  # something moved
    got = load_state(tmp_path / "out/wm")
    assert set(got) == set(sb) and all(torch.equal(got[k], want[k]) for k in sb)
    mid = load_state(tmp_path / "out/mid")
    for k in sa:
        torch.testing.assert_close(mid[k], 0.5 * sa[k] + 0.5 * want[k])
    x = N.prepare(_images(zoo)[:64], cfg)
    with torch.no_grad():
        ref = N.load(b_dir)(x)
        for name in ("wm", "ot"):  # an aligned model computes the same function
            torch.testing.assert_close(fusionlang.load(tmp_path / "out" / name)(x), ref, rtol=1e-5, atol=1e-5)


def test_barycenter_and_ot_fusion_of_permuted_copies(zoo, tmp_path):
    a = zoo / "cnn-s0"
    p1, p2 = _permuted_copy(a, tmp_path / "p1", 1), _permuted_copy(a, tmp_path / "p2", 2)
    spec = write_spec(tmp_path, f"""
use merging
models ms = [local("{a}"), local("{p1}"), local("{p2}")]
data calib = zoo_data("fashion", zoo="nets-tiny", n=50)
merge bw = wasserstein_barycenter(ms)
merge ba = wasserstein_barycenter(ms, data=calib, weights=[1, 2, 1])
merge of = ot_fusion(ms, data=calib)
merge naive = mean(ms)
merge br = wasserstein_barycenter(ms, data=calib, reset_bn=true)
save br to "out/br"
save bw to "out/bw"
save ba to "out/ba"
save of to "out/of"
save naive to "out/naive"
""")
    rc, out, err = run_cli("run", str(spec))
    assert rc == 0, out + err
    sa = load_state(a)
    for name in ("bw", "ba", "of"):
        got = load_state(tmp_path / "out" / name)
        for k in sa:
            torch.testing.assert_close(got[k], sa[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    naive = load_state(tmp_path / "out/naive")
    assert any(not torch.allclose(naive[k], sa[k], atol=1e-3) for k in sa)
    # reset_bn: the fused model's BatchNorm statistics re-estimated on the data's rows in batches of 32
    from fusionlang.stages import data as D
    from fusionlang.zoo.nets import precise_bn

    ex = D.load(D.from_args("zoo_data", {"task": "fashion", "zoo": "nets-tiny", "n": 50}, str(tmp_path / "x.fuse")))
    model = N.load(a)
    precise_bn(model, N.prepare(ex.images, model.fusion_config), batch_size=32)
    want = N.state_for_files(model)
    got = load_state(tmp_path / "out/br")
    stats = [k for k in sa if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not torch.allclose(want[k], sa[k]) for k in stats)
    for k in sa:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_align_tiny_llama_heads_and_mlp(tmp_path):
    cfg, cls = tiny_config("llama", num_hidden_layers=2)
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        d = tmp_path / f"m{seed}"
        cls(cfg).save_pretrained(d)
        dirs.append(d)
    spec = write_spec(tmp_path, f"""
model a = local("{dirs[0]}")
model b = local("{dirs[1]}")
merge al = align(b, to=a)
merge mlp_only = align(b, to=a, axes=["mlp"])
save al to "out/al"
save mlp_only to "out/mlp_only"
""")
    rc, out, err = run_cli("run", str(spec))
    assert rc == 0, out + err
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = cls.from_pretrained(dirs[1]).eval()(ids).logits
        for name in ("al", "mlp_only"):
            m = cls.from_pretrained(tmp_path / "out" / name).eval()
            torch.testing.assert_close(m(ids).logits, ref, rtol=1e-5, atol=1e-5)
    al, mo, b = (load_state(tmp_path / "out/al"), load_state(tmp_path / "out/mlp_only"), load_state(dirs[1]))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(mo[q], b[q]) and not torch.equal(al[q], b[q])  # axes=["mlp"] leaves the heads
    emb = "model.embed_tokens.weight"
    assert torch.equal(al[emb], b[emb])  # the residual stream is never permuted


ERRORS = [
    ('merge m = align(b, to=a, axes=["residual"])', "E006", "residual stream", '["residual"]'),
    ('merge m = align(c, to=a)', "E014", "differ in their tensors", "c"),
    ('merge m = align(b, to=a, data=calib)', "E006", "weight matching reads weights only", "calib"),
    ('merge m = align(b, to=a, soft=true)', "E006", "soft maps come from", "true"),
    ('merge m = align(b, to=a, method="hungarian")', "E006", "method=", '"hungarian"'),
    ('merge m = wasserstein_barycenter([a])', "E005", "at least two models", "[a]"),
    ('merge m = wasserstein_barycenter([a, b], weights=[1])', "E006", "1 weights for 2 models", "[1]"),
    ('merge m = wasserstein_barycenter([c, c], reset_bn=true)', "E006", "give data=", "true"),
    ('merge m = align(b, to=a, data=missing, method="emd")', "E010", "nope.jsonl", '"nope.jsonl"'),
    ('merge m = align(0.5 * a + 0.5 * b, to=a)', "E005", "not the value of a merge", "0.5 * a"),
]


@pytest.mark.parametrize("line,code,words,at", ERRORS, ids=[e[1] + ":" + e[3][:12] for e in ERRORS])
def test_errors_are_located(zoo, tmp_path, line, code, words, at):
    head = """model a = zoo("nets-tiny", model="mlp-s0")
model b = zoo("nets-tiny", model="mlp-s1")
model c = zoo("nets-tiny", model="cnn-s0")
data calib = zoo_data("fashion", zoo="nets-tiny", n=20)
data missing = dataset("nope.jsonl", image="image")
"""
    text = head + line + "\nsave m to \"out\"\n"
    spec = write_spec(tmp_path, text)
    rc, out, err = run_cli("compile", str(spec))
    assert rc == 1 and "Traceback" not in out + err
    locs = error_locations(out + err)
    assert locs and locs[0][2] == code, out + err
    assert words in out + err
    ln, col = locs[0][:2]
    lines = text.splitlines()
    assert lines[ln - 1][col - 1:].startswith(at), (lines[ln - 1], col, out + err)


def test_unknown_architecture_is_refused(tmp_path):
    cfg, cls = tiny_config("bert")
    for seed in (0, 1):
        torch.manual_seed(seed)
        cls(cfg).save_pretrained(tmp_path / f"m{seed}")
    spec = write_spec(tmp_path, f"""
model a = local("{tmp_path / 'm0'}")
model b = local("{tmp_path / 'm1'}")
merge m = align(b, to=a)
save m to "out"
""")
    rc, out, err = run_cli("compile", str(spec))
    assert rc == 1 and "Traceback" not in out + err
    assert error_locations(out + err)[0] == (4, 23, "E014")  # at to=: its config names the architecture
    assert "no permutation spec is known for model_type 'bert'" in out + err
