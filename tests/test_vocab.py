"""Merging models whose vocabularies differ (issue 11 §5): `tokenizer(merge, source=...)`
against MergeKit 0.1.5's `tokenizer_source` / `tokenizer:` (mergekit-yaml on the same
tiny Llamas, fine-tunes with added tokens), compared token by token (MergeKit orders the
non-base models by a set's iteration order); the output tokenizer and config load in
transformers; the default rows follow MergeKit's rules (checked independently); errors
are located."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import load_state, run_cli, word_llama, word_tokenizer, write_spec
from test_errors import expect_error
from test_mergekit_conformance import MERGEKIT, run_mergekit_batch

needs_mk = pytest.mark.skipif(MERGEKIT is None, reason="mergekit not installed (bash .ci/install_mergekit.sh)")
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# e0 has the first chat template, e1 and e2 the second (the plurality), the base none
TEMPLATES = ["{% for m in messages %}A: {{ m['content'] }}\n{% endfor %}",
             "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """base (40 tokens); e0 adds "<x>", "<y>"; e1 adds "<y>" and the special token
    "<|end|>"; e2 has the base's vocabulary. Every fine-tune is the base plus noise, its
    new rows random."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocab")
    _, vocab = word_tokenizer()
    base = word_llama(root / "base", 1)
    for i, (normal, special) in enumerate([(["<x>", "<y>"], []), (["<y>"], ["<|end|>"]), ([], [])]):
        tok, _ = word_tokenizer()
        tok.chat_template = TEMPLATES[min(i, 1)]
        tok.add_tokens(normal)
        if special:
            tok.add_special_tokens({"additional_special_tokens": special})
        g = torch.Generator().manual_seed(20 + i)
        m = LlamaForCausalLM(copy.deepcopy(base.config))
        m.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()})
        m.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for w in (m.model.embed_tokens.weight, m.lm_head.weight):
                w[len(vocab):] = torch.randn(w[len(vocab):].shape, generator=g)
        m.config.vocab_size = len(tok)
        m.save_pretrained(root / f"e{i}")
        tok.save_pretrained(root / f"e{i}")
    return root


def ours(root, name: str, body: str):
    spec = write_spec(root, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1"), local("e2")]
merge {name} = {body}
save {name} to "out/{name}"
''', f"{name}.fuse")
    rc, _out, err = run_cli("run", str(spec), "-q")
    assert rc == 0, err
    return load_state(root / "out" / name), root / "out" / name


def vocab_of(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d).get_vocab()


CASES = {
    "union_linear": (('tokenizer(linear([base, experts[0], experts[1], experts[2]], [1.0, 2.0, 1.0, 0.5]), '
                     'source="union", chat_template="auto")'),
                     "merge_method: linear\nbase_model: ./base\nmodels:\n"
                     + "".join(f"  - model: ./{m}\n    parameters:\n      weight: {w}\n"
                               for m, w in (("base", 1.0), ("e0", 2.0), ("e1", 1.0), ("e2", 0.5)))
                     + "tokenizer_source: union\nchat_template: auto\n"),
    "base_ties": ('tokenizer(ties(base, experts, density=0.5), source="base")',
                  "merge_method: ties\nbase_model: ./base\nmodels:\n"
                  + "".join(f"  - model: ./{m}\n    parameters:\n      density: 0.5\n      weight: 1.0\n"
                            for m in ("e0", "e1", "e2"))
                  + "parameters:\n  normalize: true\ntokenizer_source: base\n"),
    "e1_task_arith_pad": (('tokenizer(task_arithmetic(base, experts, scale=1.0), source=experts[1], '
                          'pad_to_multiple_of=16)'),
                          "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
                          + "".join(f"  - model: ./{m}\n    parameters:\n      weight: 1.0\n" for m in ("e0", "e1", "e2"))
                          + "tokenizer:\n  source: ./e1\n  pad_to_multiple_of: 16\n"),
}


@pytest.fixture(scope="module")
def mergekit(fam):
    return run_mergekit_batch(fam, {name: yaml for name, (_, yaml) in CASES.items()}, copy_tokenizer=True)


@needs_mk
@pytest.mark.parametrize("name", list(CASES))
def test_matches_mergekit(fam, mergekit, name):
    mine, out = ours(fam, name, CASES[name][0])
    ref_dir = mergekit[name]
    ref = load_state(ref_dir)
    v_mine, v_ref = vocab_of(out), vocab_of(ref_dir)
    assert set(v_mine) == set(v_ref)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(ref_dir).chat_template
    assert set(mine) == set(ref)
    for k in ref:
        assert mine[k].shape == ref[k].shape, k
        if k in (EMB, HEAD):  # row of each token, wherever each tool put it
            ids = list(v_ref)
            a = mine[k][[v_mine[t] for t in ids]]
            b = ref[k][[v_ref[t] for t in ids]]
            assert torch.allclose(a, b, atol=1e-6), (k, float((a - b).abs().max()))
            if a.shape[0] < ref[k].shape[0]:  # padding rows: the mean of the real ones
                assert torch.allclose(mine[k][len(ids):], ref[k][len(ids):], atol=1e-6)
        else:
            assert torch.allclose(mine[k], ref[k], atol=1e-6), (k, float((mine[k] - ref[k]).abs().max()))
    # the output loads and its config matches its rows
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(out).vocab_size == mine[EMB].shape[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == mine[EMB].shape[0]


def test_union_rows_follow_mergekit_rules(fam):
    """An independent check of the default rows on the union's average: a token all
    models have is the weighted mean of their rows; "<x>" (only e0) takes e0's row in
    every model, so the mean is e0's row; "<y>" (e0, e1; not the base) is their mean in
    the models that lack it."""
    mine, out = ours(fam, "avg", 'tokenizer(average([base, experts[0], experts[1], experts[2]]), source="union")')
    v = vocab_of(out)
    states = {n: load_state(fam / n) for n in ("base", "e0", "e1", "e2")}
    vs = {n: vocab_of(fam / n) for n in states}
    for k in (EMB, HEAD):
        rows = {n: (lambda t, n=n, k=k: states[n][k][vs[n][t]] if t in vs[n] else None) for n in states}
        for t in ("cat", "[PAD]"):
            want = sum(rows[n](t) for n in states) / 4
            assert torch.allclose(mine[k][v[t]], want, atol=1e-6)
        assert torch.allclose(mine[k][v["<x>"]], rows["e0"]("<x>"), atol=1e-6)
        y = (rows["e0"]("<y>") + rows["e1"]("<y>")) / 2
        want = (y + rows["e0"]("<y>") + rows["e1"]("<y>") + y) / 4
        assert torch.allclose(mine[k][v["<y>"]], want, atol=1e-6)
        assert torch.allclose(mine[k][v["<|end|>"]], rows["e1"]("<|end|>"), atol=1e-6)
    # "<|end|>" stays a special added token of the output tokenizer (never split, skipped
    # when decoding with skip_special_tokens)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert [t.special for t in tok.added_tokens_decoder.values() if t.content == "<|end|>"] == [True]
    assert tok.decode(tok("cat <|end|>")["input_ids"], skip_special_tokens=True).strip() == "cat"


@pytest.mark.parametrize("arg,want", [("experts[0]", 0), ('"auto"', 1), ("none", None)])
def test_chat_template_is_chosen(fam, arg, want):
    from transformers import AutoTokenizer

    name = f"ct_{want}"
    _, out = ours(fam, name, f'tokenizer(average(experts), source="base", chat_template={arg})')
    got = AutoTokenizer.from_pretrained(out).chat_template
    # none: the source tokenizer's own (the base of the merge is e0 here: its template)
    assert got == TEMPLATES[want if want is not None else 0]


def test_without_tokenizer_the_mismatch_says_how(fam):
    spec = write_spec(fam, '''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
merge m = ties(base, experts, density=0.5)
save m to "out/m"
''', "nomatch.fuse")
    d = expect_error(run_cli("compile", str(spec)), "E014", line=4)
    assert "tokenizer(" in d["hint"], d


@pytest.mark.parametrize("body,code,needle", [
    ('tokenizer(average(experts), source="all")', "E006", "source"),
    ('tokenizer(average(experts), pad_to_multiple_of=0)', "E006", "pad_to_multiple_of"),
    ('tokenizer(average(experts), chat_template="chatml3")', "E006", "chatml, llama3, mistral, alpaca, exaone"),
    ('average([tokenizer(average(experts)), base])', "E005", "whole value"),
])
def test_mistakes_are_located(fam, body, code, needle):
    spec = write_spec(fam, f'''use merging
model base = local("base")
models experts = [local("e0"), local("e1")]
merge m = {body}
save m to "out/m"
''', "bad.fuse")
    d = expect_error(run_cli("compile", str(spec)), code, line=4)
    assert needle in d["msg"] + d["hint"], d


CONVERSATIONS = [
    [{"role": "user", "content": " Hi there "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4 "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "user_context", "content": "ctx"}],
]


@needs_mk
@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca", "exaone"])
def test_named_chat_templates_render_as_mergekits(fam, name):
    """MergeKit's named templates (its package's own .jinja files): the output tokenizer
    renders every conversation as MergeKit's template does, with and without a generation
    prompt; alpaca and exaone equal but for MergeKit's stray whitespace (module
    fusionlang.arch.chat_templates), and in the formats' own layout."""
    import subprocess
    from pathlib import Path

    from transformers import AutoTokenizer

    _, out = ours(fam, f"named_{name}", f'tokenizer(average(experts), source="base", chat_template="{name}")')
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(out)
    ref.chat_template = subprocess.run(  # MergeKit's own file, read by its own install
        [str(Path(MERGEKIT).parent / "python"), "-c", ("import importlib.resources as r, sys; "
         "sys.stdout.write(r.files('mergekit._data.chat_templates').joinpath(sys.argv[1]).read_text())"),
         f"{name}.jinja"], capture_output=True, text=True, check=True).stdout
    def render(t, conv, gen):
        try:
            return t.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 (a refusal, e.g. mistral's for other roles: both must refuse)
            return f"refused: {e}"

    refused = 0
    for conv in CONVERSATIONS:
        for gen in (False, True):
            for specials in (False, True):
                for t in (tok, ref):  # the word tokenizer has no bos / eos: both templates must cope alike
                    t.bos_token, t.eos_token = ("<s>", "</s>") if specials else (None, None)
                got, want = render(tok, conv, gen), render(ref, conv, gen)
                if name in ("alpaca", "exaone"):
                    assert "".join(got.split()) == "".join(want.split()), (conv, gen, got, want)
                else:
                    assert got == want, (conv, gen, got, want)
                refused += specials and got.startswith("refused")
    assert refused <= 2  # with bos / eos every conversation renders (but mistral's user_context one)
    layouts = {  # the formats as their authors write them (independent of both templates)
        "alpaca": "Be brief.\n\n### Instruction:\n2+2?\n\n### Response:\n4",
        "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]2+2?\n[|assistant|]4 [|endofturn|]\n",
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
                  "4 <|im_end|>\n",
    }
    if name in layouts:
        assert tok.apply_chat_template(CONVERSATIONS[1], tokenize=False) == layouts[name]


def test_a_model_without_tokenizer_files_is_located(fam, tmp_path):
    """tokenizer() reads every model's tokenizer: a directory without one is E011 naming it."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(fam / "e2", bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    spec = write_spec(fam, f'''use merging
model base = local("base")
model bare = local("{bare}")
merge m = tokenizer(average([base, bare]))
save m to "out/bare"
''', "bare.fuse")
    d = expect_error(run_cli("compile", str(spec)), "E011", line=4)
    assert "tokenizer of 'bare'" in d["msg"], d
