"""Data values and model stages: located errors for bad data, the stage cache (reused,
and recomputed when the model or the data change), the plan's stage lines, and the
statistics against independent computations (a Conv2d's Gram matrix from explicit
patches; RegMean's closed form against least squares on the stacked inputs)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import error_locations, load_state, make_classifier_family, run_cli, write_spec


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return root, make_classifier_family(root, n_experts=2, rows=40, seed=3)


HEAD = '''use merging
models experts = [local("e0"), local("e1")]
'''


@pytest.mark.parametrize("cmd", ["check", "compile", "run"])
@pytest.mark.parametrize("data,line_col,code,words", [
    ('dataset("nope.jsonl", text="text")', (3, 18), "E010", "does not exist"),
    ('dataset("data0.jsonl", text="txt")', (3, 38), "E006", 'did you mean text="text"'),
    ('dataset("data0.jsonl", text="text", n=500)', (3, 48), "E006", "which has 40"),
    ('dataset("data0.jsonl", text="text", label="text")', (3, 52), "E006", "class indices"),
    ('dataset("data0.jsonl")', (3, 18), "E006", "which column holds the inputs"),
    ('dataset("empty.jsonl", text="text")', (3, 18), "E006", "is empty"),
    ('dataset("bad.jsonl", text="text")', (3, 18), "E011", "cannot read data file"),
    ('dataset("data0.txt", text="text")', (3, 18), "E006", "format"),
])
def test_bad_data_is_a_located_error_before_anything_runs(fam, cmd, data, line_col, code, words):
    root, _ = fam
    (root / "empty.jsonl").write_text("")
    (root / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    (root / "data0.txt").write_text("x\n")
    spec = write_spec(root, HEAD + f"data d = {data}\nmerge rm = regmean(experts, d)\nsave rm to \"out/bad\"\n",
                      f"bad_{cmd}.fuse")
    rc, out, err = run_cli(cmd, str(spec))
    if cmd == "check" and code == "E010":
        # check reads no files: an absent file is "not verified" there
        assert rc == 0, err
        return
    assert rc == 1, (out, err)
    assert "Traceback" not in err
    errs = error_locations(err)
    assert errs and errs[0][2] == code, err
    assert errs[0][:2] == line_col, err
    assert words in err
    assert not (root / "out" / "bad").exists()


def test_data_count_and_fisher_without_head_are_located(fam, tmp_path):
    root, f = fam
    spec = write_spec(root, HEAD + 'data d = dataset("data0.jsonl", text="text")\n'
                      "merge rm = regmean(experts, [d, d, d])\nsave rm to \"out/n\"\n", "count.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "3 data values for 2 models" in err and error_locations(err)[0][2] == "E006", err
    # a bare encoder (no classification head) has no predictions for Fisher weights
    from transformers import BertModel

    enc = BertModel.from_pretrained(str(f["e0"]))
    enc.save_pretrained(root / "enc")
    for p in f["e0"].glob("tokenizer*"):
        (root / "enc" / p.name).write_bytes(p.read_bytes())
    spec = write_spec(root, 'use merging\nmodels encs = [local("enc"), local("enc")]\n'
                      'data d = dataset("data0.jsonl", text="text")\n'
                      "merge fm = fisher_merging(encs, d)\nsave fm to \"out/f\"\n", "nohead.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "no classification head" in err and error_locations(err)[0][2] == "E014", err
    # ...while Gram matrices need only the layer inputs
    spec = write_spec(root, 'use merging\nmodels encs = [local("enc"), local("enc")]\n'
                      'data d = dataset("data0.jsonl", text="text")\n'
                      "merge rm = regmean(encs, d)\nsave rm to \"out/r\"\n", "enc_rm.fuse")
    rc, _, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    # RegMean of two identical models is that model
    a, b = load_state(root / "enc"), load_state(root / "out" / "r")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_compile_shows_stages_with_cost_and_run_caches_them(fam, tmp_path, monkeypatch):
    root, _ = fam
    monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / "cache"))
    body = HEAD + ('data d0 = dataset("data0.jsonl", text="text", n=24, seed=1)\n'
                   'data d1 = dataset("data1.jsonl", text="text", n=24, seed=1)\n'
                   "merge rm = regmean(experts, [d0, d1], batch_size=8)\nsave rm to \"out/c\"\n")
    spec = write_spec(root, body, "cache.fuse")
    rc, out, err = run_cli("compile", str(spec), "--emit", "text")
    assert rc == 0, err
    lines = [x for x in out.splitlines() if x.startswith("stage ")]
    assert len(lines) == 2 and "24 examples in 3 forward passes" in lines[0] and "1 model resident" in lines[0], out
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    assert err.count("batch 3/3") == 2, err
    cached = sorted((tmp_path / "cache" / "stages").glob("*.safetensors"))
    assert len(cached) == 2
    first = load_state(root / "out" / "c")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0 and err.count("cached") == 2 and "batch" not in err, err
    assert all(torch.equal(first[k], v) for k, v in load_state(root / "out" / "c").items())
    # other rows: a new statistic, and a different result
    write_spec(root, body.replace("seed=1)\ndata d1", "seed=2)\ndata d1"), "cache.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0 and err.count("cached") == 1, err
    assert len(list((tmp_path / "cache" / "stages").glob("*.safetensors"))) == 3
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(first[w], load_state(root / "out" / "c")[w])


def test_conv_gram_matches_explicit_patches():
    from fusionlang.stages.data import Examples
    from fusionlang.stages.models import StageModel
    from fusionlang.stages.statistics import gram

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, stride=2),
                              torch.nn.Conv2d(4, 4, 3, padding=1, groups=4),
                              torch.nn.Conv2d(4, 6, 1)).eval()
    x = torch.randn(5, 3, 7, 7)
    names = {n: n for n, _ in net.named_parameters()}
    sm = StageModel(net, names, lambda ex, a, b: {"x": x[a:b]}, lambda batch: net(batch["x"]), None)
    ex = Examples(texts=tuple("abcde"), images=None, labels=None, fingerprint="")
    g = gram(sm, ex, batch_size=2)

    def patches(inp, k, pad, stride):  # explicit loops over output positions
        inp = torch.nn.functional.pad(inp, (pad, pad, pad, pad))
        rows = []
        for b in range(inp.shape[0]):
            for i in range(0, inp.shape[2] - k + 1, stride):
                for j in range(0, inp.shape[3] - k + 1, stride):
                    rows.append(inp[b, :, i:i + k, j:j + k])
        return torch.stack(rows).double()  # [rows, C, k, k]

    with torch.no_grad():
        h1 = net[0](x)
        h2 = net[1](h1)
    p0 = patches(x, 3, 1, 2).reshape(-1, 27)
    assert torch.allclose(g["0.weight"].double(), p0.T @ p0 / len(p0), atol=1e-5)
    p1 = patches(h1, 3, 1, 1)  # depthwise: one 9x9 Gram per channel
    ref1 = torch.stack([p1[:, c].reshape(-1, 9).T @ p1[:, c].reshape(-1, 9) / len(p1) for c in range(4)])
    assert torch.allclose(g["1.weight"].double(), ref1, atol=1e-5)
    p2 = h2.permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert torch.allclose(g["2.weight"].double(), p2.T @ p2 / len(p2), atol=1e-5)


def test_regmean_solve_is_the_least_squares_fit_of_every_models_outputs():
    from fusionlang.ops.stat_weighted import regmean_solve

    torch.manual_seed(1)
    xs = [torch.randn(50, 6).double() for _ in range(3)]
    ws = [torch.randn(4, 6) for _ in range(3)]
    grams = [(x.T @ x / len(x)).float() for x in xs]
    merged = regmean_solve(ws, grams, alpha=1.0).double()
    # least squares over the stacked inputs, each model's rows scaled by 1/sqrt(N_i)
    a = torch.cat([x / len(x) ** 0.5 for x in xs])
    y = torch.cat([x @ w.double().T / len(x) ** 0.5 for x, w in zip(xs, ws)])
    ref = torch.linalg.lstsq(a, y).solution.T
    assert torch.allclose(merged, ref, atol=1e-5)
    # a dead input dimension (zero on all the data) takes the models' average weights
    for x in xs:
        x[:, 2] = 0
    grams = [(x.T @ x / len(x)).float() for x in xs]
    merged = regmean_solve(ws, grams, alpha=0.9)
    assert torch.allclose(merged[:, 2], sum(w[:, 2] for w in ws) / 3, atol=1e-6)
    assert torch.isfinite(merged).all()


def test_a_saved_plan_runs_its_stages(fam, tmp_path, monkeypatch):
    root, _ = fam
    monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / "cache"))
    spec = write_spec(root, HEAD + 'data d = dataset("data1.jsonl", text="text", n=16)\n'
                      "merge fm = fisher_merging(experts, d, batch_size=4)\nsave fm to \"out/p\"\n", "plan.fuse")
    plan = tmp_path / "plan.json"
    rc, _, err = run_cli("compile", str(spec), "--emit", "json", "-o", str(plan))
    assert rc == 0, err
    stages = [s for s in json.loads(plan.read_text())["sources"].values() if s["stage"]]
    assert len(stages) == 2 and stages[0]["stage"]["data"]["n"] == 16
    rc, _, err = run_cli("run", str(plan))
    assert rc == 0, err
    via_plan = load_state(root / "out" / "p")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0 and err.count("cached") == 2, err
    assert all(torch.equal(via_plan[k], v) for k, v in load_state(root / "out" / "p").items())


def test_adamerging_coefficients_reach_report_json(fam, tmp_path, monkeypatch):
    root, _ = fam
    monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / "cache"))
    spec = write_spec(root, '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
let d = [dataset("data0.jsonl", text="text", n=16), dataset("data1.jsonl", text="text", n=16)]
merge am = adamerging(base, experts, d, steps=3, lr=0.05, batch_size=8)
task t = accuracy(dataset("data0.jsonl", text="text", label="label", n=16))
eval am on t to "rep_am"
''', "am_report.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    line = next(x for x in err.splitlines() if "learned coefficients" in x)
    learned = json.loads((root / "rep_am" / "report.json").read_text())["learned"]["am"][0]
    assert learned["mode"] == "task" and set(learned["coefficients"]) == {"experts[0]", "experts[1]"}
    for m, v in learned["coefficients"].items():
        assert f"{m}: {v:.4f}" in line
        assert v != pytest.approx(0.3, abs=1e-4)  # 3 Adam steps of lr 0.05 moved them


def test_csv_parquet_and_saved_datasets_are_the_same_data(fam, tmp_path):
    import datasets

    from fusionlang.stages import data as D

    root, _ = fam
    rows = [json.loads(x) for x in (root / "data0.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    want = D.load({"kind": "files", "path": str(root / "data0.jsonl"), "format": "auto", "text": "text", "image": None,
                   "label": "label", "split": "train", "n": 20, "seed": 4})
    assert len(want) == 20 and want.labels is not None
    for path, split in ((tmp_path / "d.csv", "train"), (tmp_path / "d.parquet", "train"), (tmp_path / "saved", "train"),
                        (tmp_path / "saved_dict", "test")):
        got = D.load({"kind": "files", "path": str(path), "format": "auto", "text": "text", "image": None,
                      "label": "label", "split": split, "n": 20, "seed": 4})
        assert got.texts == want.texts and got.labels == want.labels and got.fingerprint == want.fingerprint, path
    # the seed draws a permutation: another seed, other rows; no seed, the first rows
    other = D.load({"kind": "files", "path": str(root / "data0.jsonl"), "format": "auto", "text": "text",
                       "image": None, "label": None, "split": "train", "n": 20, "seed": 5})
    first = D.load({"kind": "files", "path": str(root / "data0.jsonl"), "format": "auto", "text": "text", "image": None,
                    "label": None, "split": "train", "n": 20, "seed": None})
    assert other.texts != want.texts and first.texts == tuple(r["text"] for r in rows[:20])
    # a DatasetDict without the split asked for is a located error
    spec = write_spec(root, HEAD + f'data d = dataset("{tmp_path / "saved_dict"}", text="text")\n'
                      "merge rm = regmean(experts, d)\nsave rm to \"out/dd\"\n", "dd.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "no split 'train' (splits: test)" in err and error_locations(err)[0][2] == "E006", err


def test_image_classifiers_on_image_data(tmp_path):
    """A user's ViT classifiers and image rows (a datasets Image column): Gram matrices
    (its patch embedding is a Conv2d), Fisher weights and accuracy() all run; accuracy
    equals the model's own predictions; RegMean of a model with itself is the model."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    proc = ViTImageProcessor(size={"height": 16, "width": 16})
    for k in range(2):
        torch.manual_seed(k)
        m = ViTForImageClassification(config).eval()
        m.save_pretrained(tmp_path / f"v{k}")
        proc.save_pretrained(tmp_path / f"v{k}")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(12)]
    ds = datasets.Dataset.from_dict({"img": images, "label": [int(x) for x in rng.integers(0, 3, 12)]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "imgs"))
    spec = write_spec(tmp_path, '''use merging
models vits = [local("v0"), local("v1")]
model v0 = local("v0")
data imgs = dataset("imgs", image="img", label="label")
merge rm = regmean(vits, imgs, batch_size=5)
merge self = regmean([v0, v0], imgs, batch_size=5)
merge fm = fisher_merging(vits, imgs, batch_size=4)
task t = accuracy(imgs, batch_size=5)
save rm to "out/rm"
save self to "out/self"
save fm to "out/fm"
eval rm, fm, v0 on t to "rep"
''', "vit.fuse")
    rc, _, err = run_cli("compile", str(spec), "--emit", "json", "-o", str(tmp_path / "plan.json"))
    assert rc == 0, err
    grams = [s for s in json.loads((tmp_path / "plan.json").read_text())["sources"].values()
             if s["stage"] and s["stage"]["kind"] == "gram"]
    # the patch embedding is a Conv2d [16, 3, 8, 8]: one Gram matrix over its 3·8·8 patch entries
    assert grams and grams[0]["tensors"]["vit.embeddings.patch_embeddings.projection.weight"][1] == [192, 192]
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    a, b = load_state(tmp_path / "v0"), load_state(tmp_path / "out" / "self")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    m = ViTForImageClassification.from_pretrained(str(tmp_path / "v0")).eval()
    with torch.no_grad():
        pred = m(**proc(images=[im.convert("RGB") for im in images], return_tensors="pt")).logits.argmax(-1)
    acc = float((pred == torch.tensor(ds["label"])).float().mean())
    assert report["rows"]["v0"]["accuracy"]["t"] == pytest.approx(acc)


def test_tune_candidates_reuse_the_stage_results(fam, tmp_path, monkeypatch):
    root, _ = fam
    monkeypatch.setenv("FUSIONLANG_CACHE", str(tmp_path / "cache"))
    spec = write_spec(root, HEAD + '''let d = [dataset("data0.jsonl", text="text", n=16), dataset("data1.jsonl", text="text", n=16)]
task t = accuracy(dataset("data1.jsonl", text="text", label="label", n=16))
merge rm = regmean(experts, d, alpha=tune([0.3, 0.6, 0.9], on=[t]), batch_size=8)
eval rm on t to "rep_tune_rm"
''', "tune_rm.fuse")
    rc, _, err = run_cli("run", str(spec))
    assert rc == 0, err
    # each model's Gram matrices are computed once (2 stages), then read from the cache by
    # the other candidates and the final merge (2 stages x 3 more runs)
    assert err.count("batch 2/2") == 2 and err.count("cached") == 6, err
    assert len(list((tmp_path / "cache" / "stages").glob("*.safetensors"))) == 2


def test_batch_size_zero_is_refused(fam):
    root, _ = fam
    spec = write_spec(root, HEAD + 'data d = dataset("data0.jsonl", text="text")\n'
                      "merge rm = regmean(experts, d, batch_size=0)\nsave rm to \"out/bs0\"\n", "bs0.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and "batch_size=0 must be a whole number of at least 1" in err, err
    assert error_locations(err) == [(4, 43, "E006")] and "bs0.fuse" in err, err


def test_unknown_batch_order_is_refused_at_the_argument(fam):
    root, _ = fam
    spec = write_spec(root, HEAD + 'data d = dataset("data0.jsonl", text="text")\n'
                      'merge fm = fisher_merging(experts, d, batch_order="random")\nsave fm to "out/bo"\n', "bo.fuse")
    rc, _, err = run_cli("compile", str(spec))
    assert rc == 1 and 'batch_order="random" is neither "length" nor "given"' in err, err
    assert error_locations(err) == [(4, 51, "E006")] and "bo.fuse" in err, err


def _stage_model(root, f, model="e0", data="data0"):
    from fusionlang.stages import data as D
    from fusionlang.stages import models as M

    spec = D.from_args("dataset", {"path": str(f[data]), "text": "text"}, str(root / "x.fuse"))
    return M.build(str(f[model]), spec, torch.device("cpu")), D.load(spec)


def _worst(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) / (1 + float(b[k].abs().max())) for k in a)


def test_gram_leaves_padding_out_whatever_the_batching(fam, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fusionlang.stages import models as M
    from fusionlang.stages.statistics import gram

    root, f = fam
    sm, ex = _stage_model(root, f)
    g7 = gram(sm, ex, batch_size=7)
    g3 = gram(sm, ex, batch_size=3)
    padded = gram(sm, ex, batch_size=7, include_padding=True)
    monkeypatch.setattr(M, "TOKENS_PER_PASS", 20)  # each batch of 16 rows run in slices of 1-2 rows
    sliced = gram(sm, ex, batch_size=16)
    # independent: every row alone (no padding at all), every Linear's input by hooks, float64
    model = AutoModelForSequenceClassification.from_pretrained(f["e0"]).eval()
    tok = AutoTokenizer.from_pretrained(f["e0"])
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def fn(_m, args, _o):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook(n + ".weight"))
    texts = [json.loads(x)["text"] for x in f["data0"].read_text().splitlines()]
    with torch.no_grad():
        for t in texts:
            model(**tok(t, return_tensors="pt"))
    ref = {k: (sums[k] / rows[k]).float() for k in sums}
    for g in (g7, g3, sliced):
        assert _worst(g, ref) < 1e-5
    # counting the padded positions gives other matrices (the test can tell them apart)
    assert _worst(padded, ref) > 1e-3


def test_fisher_batches_by_length_and_slices_exactly(fam, monkeypatch):
    from transformers import AutoTokenizer

    from fusionlang.stages import models as M
    from fusionlang.stages.data import Examples
    from fusionlang.stages.statistics import fisher

    root, f = fam
    sm, ex = _stage_model(root, f)
    by_length = fisher(sm, ex, 8)
    given = fisher(sm, ex, 8, batch_order="given")
    # "length": the rows in order of their token count (stable), then batched as given
    tok = AutoTokenizer.from_pretrained(f["e0"])
    order = sorted(range(len(ex)), key=lambda i: len(tok(ex.texts[i])["input_ids"]))
    ex_sorted = Examples(tuple(ex.texts[i] for i in order), None, None, "")
    assert _worst(by_length, fisher(sm, ex_sorted, 8, batch_order="given")) < 1e-5
    assert _worst(by_length, given) > 1e-4  # which rows share a batch matters to this estimator
    monkeypatch.setattr(M, "TOKENS_PER_PASS", 20)  # each batch's gradient accumulated over slices
    assert _worst(fisher(sm, ex, 8, batch_order="given"), given) < 1e-5


def test_model_hash_is_remembered_and_sees_any_rewrite(tmp_path):
    """The per-file digests are remembered across runs (a memo in the cache), and a file
    rewritten with the same size and modification time still gets a new hash."""
    import os

    from fusionlang.stages import run as R

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    w = d / "model.safetensors"
    w.write_bytes(b"a" * 1000)
    first = R.model_hash(str(d))
    memo = json.loads(R._memo_file().read_text())
    assert any(k.startswith(str(w.resolve()) + "|") for k in memo)
    R._MODEL_HASHES.clear()  # a new process: the memo on disk answers
    assert R.model_hash(str(d)) == first
    st = w.stat()
    w.write_bytes(b"b" * 1000)  # same size; the modification time put back
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    R._MODEL_HASHES.clear()
    second = R.model_hash(str(d))
    assert second != first
    import hashlib

    import xxhash

    expect = hashlib.sha256()
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"b" * 1000)):
        expect.update(name.encode() + b"\0" + xxhash.xxh3_128(data).hexdigest().encode())
    assert second == expect.hexdigest()
    big = d / "model-00002-of-00002.safetensors"  # more than one 64 MiB block of the mapping
    data = os.urandom(1 << 20) * 70
    big.write_bytes(data)
    assert R._file_digest(big) == xxhash.xxh3_128(data).hexdigest()
    (d / "empty.safetensors").write_bytes(b"")
    assert R._file_digest(d / "empty.safetensors") == xxhash.xxh3_128(b"").hexdigest()
