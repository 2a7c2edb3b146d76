"""Alignment (issue 12 §1): permutation specs, weight matching, OT maps and barycenters on
real tiny models (MLP, CNN with BatchNorm, Llama and GPT-2 from transformers configs)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fusionlang.arch import nets
from fusionlang.arch import permutation as P
from fusionlang.stages import align as A
from fusionlang.stages import matching as X


def _net(cfg: dict, seed: int):
    torch.manual_seed(seed)
    m = nets.build(cfg)
    with torch.no_grad():
        for mod in m.modules():  # BatchNorm statistics and affine weights that matter, no dead channel
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(0.5, 1.0)
    return m


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def _permuted(spec, state, seed):
    g = torch.Generator().manual_seed(seed)
    maps = {p.name: torch.randperm(p.size, generator=g) for p in spec.perms}
    return X.apply_maps(spec, state, maps), maps


NETS = {"mlp": nets.mlp([48, 24]), "cnn": nets.cnn([8, 16], pool_every=1)}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_net_permuted_and_aligned_back(kind):
    cfg = NETS[kind]
    m = _net(cfg, 0)
    st = nets.state_for_files(m)
    spec = P.derive(cfg, _shapes(st))
    if kind == "cnn":  # BatchNorm's four vectors travel with their channels
        members = {(mm.tensor, mm.axis) for mm in spec.perms[0].members}
        assert {("net.1.weight", 0), ("net.1.bias", 0), ("net.1.running_mean", 0), ("net.1.running_var", 0),
                ("net.0.weight", 0), ("net.4.weight", 1)} <= members
    pst, maps = _permuted(spec, st, 1)
    assert any(not torch.equal(pst[k], st[k]) for k in st)
    m2 = nets.build(cfg)
    m2.load_state_dict(pst, strict=False)
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x), rtol=1e-5, atol=1e-5)  # a permutation keeps the function
    for method in ("weight", "emd"):
        aligned, found = A.align_states(spec, st, pst, method=method)
        for p in spec.perms:
            assert torch.equal(found[p.name], torch.argsort(maps[p.name])), (method, p.name)
        for k in st:
            assert torch.equal(aligned[k], st[k]), (method, k)
    acts = [A.activations(mod, spec, [x], mod) for mod in (m, m2)]
    aligned, found = A.align_states(spec, st, pst, method="emd", acts_ref=acts[0], acts_other=acts[1])
    wm = X.weight_matching(spec, st, pst)
    for p in spec.perms:  # OT with hard maps from activations = weight matching on permuted copies
        assert torch.equal(found[p.name], wm[p.name])


def test_aligned_model_computes_the_same_function():
    cfg = NETS["cnn"]
    a, b = _net(cfg, 0), _net(cfg, 1)
    sa, sb = nets.state_for_files(a), nets.state_for_files(b)
    spec = P.derive(cfg, _shapes(sa))
    x = torch.randn(16, 1, 28, 28)
    acts = [A.activations(mod, spec, [x], mod) for mod in (a, b)]
    for kw in ({"method": "weight"}, {"method": "emd", "acts_ref": acts[0], "acts_other": acts[1]},
               {"method": "sinkhorn", "reg": 0.05}):
        aligned, maps = A.align_states(spec, sa, sb, **kw)
        assert any(not torch.equal(maps[p.name], torch.arange(p.size)) for p in spec.perms)
        m = nets.build(cfg)
        m.load_state_dict(aligned, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(m(x), b(x), rtol=1e-5, atol=1e-5)


def test_weight_matching_lowers_the_distance():
    cfg = NETS["mlp"]
    sa, sb = (nets.state_for_files(_net(cfg, s)) for s in (0, 1))
    spec = P.derive(cfg, _shapes(sa))
    aligned, _ = A.align_states(spec, sa, sb)

    def dist(s):
        return sum(float(((s[k] - sa[k]) ** 2).sum()) for k in sa)

    assert dist(aligned) < 0.95 * dist(sb)


def test_soft_sinkhorn_maps_are_stochastic():
    cfg = NETS["mlp"]
    sa, sb = (nets.state_for_files(_net(cfg, s)) for s in (0, 1))
    spec = P.derive(cfg, _shapes(sa))
    maps = X.transport_maps(spec, sa, sb, solver="sinkhorn", reg=0.05, soft=True)
    for p in spec.perms:
        mp = maps[p.name]
        assert mp.shape == (p.size, p.size) and mp.dtype == torch.float64
        torch.testing.assert_close(mp.sum(1), torch.ones(p.size, dtype=torch.float64))
        assert (mp > 1e-3).sum() > p.size  # soft: mass on more than one unit per row
    aligned = X.apply_maps(spec, sa, {p.name: torch.eye(p.size, dtype=torch.float64) for p in spec.perms})
    assert all(torch.allclose(aligned[k], sa[k]) for k in sa)  # the identity map changes nothing


@pytest.mark.parametrize("use_acts", [False, True])
def test_barycenter_of_permuted_copies_is_the_model(use_acts):
    cfg = NETS["cnn"]
    m = _net(cfg, 0)
    st = nets.state_for_files(m)
    spec = P.derive(cfg, _shapes(st))
    copies = [st] + [_permuted(spec, st, s)[0] for s in (1, 2, 3)]
    acts = None
    if use_acts:
        x = torch.randn(16, 1, 28, 28)
        acts = []
        for c in copies:
            mod = nets.build(cfg)
            mod.load_state_dict(c, strict=False)
            acts.append(A.activations(mod, spec, [x], mod))
    fused, _ = X.barycenter(spec, copies, acts=acts)
    for k in st:
        torch.testing.assert_close(fused[k], st[k], rtol=1e-6, atol=1e-6)
    naive = {k: sum(c[k] for c in copies) / 4 for k in st}
    assert any(not torch.allclose(naive[k], st[k], atol=1e-3) for k in st)  # the naive average is not


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformer_mlp_units_and_heads(arch):
    cfg, cls = tiny_config(arch, **({"num_hidden_layers": 2} if arch == "llama" else {"n_layer": 2}))
    torch.manual_seed(0)
    m = cls(cfg).eval()
    st = {k: v.detach().clone() for k, v in m.state_dict().items()}
    spec = P.derive(cfg.to_dict(), _shapes(st))
    assert {p.kind for p in spec.perms} == {"mlp", "heads"}
    if arch == "llama":  # grouped-query attention: a key/value head with its 2 query heads is one unit
        heads = next(p for p in spec.perms if p.kind == "heads")
        assert heads.size == 2 and {mm.unit for mm in heads.members} == {8, 16}
    pst, _maps = _permuted(spec, st, 5)
    m2 = cls(cfg).eval()
    m2.load_state_dict(pst)
    ids = torch.randint(0, 96, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)
    aligned, found = A.align_states(spec, st, pst)
    assert all(torch.equal(aligned[k], st[k]) for k in st)
    acts = [A.activations(mod, spec, [ids], mod) for mod in (m, m2)]
    _, ot_maps = A.align_states(spec, st, pst, method="emd", acts_ref=acts[0], acts_other=acts[1])
    assert all(torch.equal(ot_maps[k], found[k]) for k in found)


def test_unpermutable_axes_are_refused():
    cfg, _cls = tiny_config("llama")
    shapes = {"model.layers.0.self_attn.q_proj.weight": (32, 32)}
    with pytest.raises(P.PermutationError) as e:
        P.derive(cfg.to_dict(), shapes, axes=("residual",))
    assert e.value.code == "E006" and "residual stream" in e.value.message and e.value.arg == "axes"
    with pytest.raises(P.PermutationError) as e:
        P.derive({"model_type": "bert"}, {})
    assert e.value.code == "E014" and "'bert'" in e.value.message
    cfg = NETS["mlp"]
    st = nets.state_for_files(_net(cfg, 0))
    spec = P.derive(cfg, _shapes(st))
    tied = P.PermSpec(spec.perms + (P.Perm("tied", "hidden", 48, (P.Member("net.1.weight", 0),)),))
    with pytest.raises(P.PermutationError) as e:
        P.check(tied, _shapes(st))
    assert "tied weights" in e.value.message and "net.1.weight" in e.value.message
    bad = dict(_shapes(st), **{"net.3.weight": (24, 40)})
    with pytest.raises(P.PermutationError) as e:
        P.derive(cfg, bad)
    assert e.value.code == "E014" and "net.3.weight" in e.value.message
