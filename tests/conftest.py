"""Shared fixtures: tiny random models built from `transformers` configs, saved to disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fusionlang.runtime.openmp import set_wait_policy  # torch-free

set_wait_policy()  # before torch loads OpenMP: as the CLI (fusionlang/cli.py)

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("NO_COLOR", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """A cache directory of the test session's own for model-stage results (and the
    remembered MoE layouts), so a stage is computed by the code under test instead of
    read from an earlier run's cache (the tiny models are seeded: their content hashes
    repeat across runs). The built zoos and fetched packages of the user's cache are
    linked in (building them takes minutes); tests that need another cache set
    FUSIONLANG_CACHE themselves."""
    from fusionlang.zoo.paths import cache_dir

    real = cache_dir()
    mine = tmp_path_factory.mktemp("fusionlang-cache")
    for sub in ("zoo", "packages"):
        if (real / sub).exists():
            (mine / sub).symlink_to(real / sub, target_is_directory=True)
    old = os.environ.get("FUSIONLANG_CACHE")
    os.environ["FUSIONLANG_CACHE"] = str(mine)
    yield mine
    if old is None:
        os.environ.pop("FUSIONLANG_CACHE", None)
    else:
        os.environ["FUSIONLANG_CACHE"] = old


def tiny_config(arch: str, **overrides):
    import transformers as tf

    if arch == "llama":
        cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64, "tie_word_embeddings": False}
        cfg.update(overrides)
        return tf.LlamaConfig(**cfg), tf.LlamaForCausalLM
    if arch == "gpt2":
        cfg = {"n_embd": 32, "n_layer": 3, "n_head": 4, "vocab_size": 96, "n_positions": 64}
        cfg.update(overrides)
        return tf.GPT2Config(**cfg), tf.GPT2LMHeadModel
    if arch == "bert":
        cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 96,
                   "max_position_embeddings": 64}
        cfg.update(overrides)
        return tf.BertConfig(**cfg), tf.BertModel
    if arch == "vit":
        cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 16,
                   "patch_size": 8, "num_labels": 3}
        cfg.update(overrides)
        return tf.ViTConfig(**cfg), tf.ViTForImageClassification
    raise ValueError(arch)


def make_family(root: Path, arch: str = "llama", n_experts: int = 3, noise: float = 0.02, seed: int = 0,
                dtype: torch.dtype = torch.float32, **overrides) -> dict[str, Path]:
    """base + experts (base + noise) saved as safetensors model dirs under root."""
    cfg, cls = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    base = cls(cfg).to(dtype)
    out = {"base": root / "base"}
    base.save_pretrained(out["base"], safe_serialization=True)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(n_experts):
        m = cls(cfg).to(dtype)
        sd = {k: (v + noise * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v
              for k, v in state.items()}
        m.load_state_dict(sd)
        out[f"e{i}"] = root / f"e{i}"
        m.save_pretrained(out[f"e{i}"], safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("gpt2"), "gpt2", n_experts=2)


@pytest.fixture(scope="session")
def bert(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("bert"), "bert", n_experts=2)


def error_locations(text: str) -> list[tuple[int, int, str]]:
    """(line, column, code) of every `file.fuse:L:C: error[Ecode]` in CLI output."""
    import re

    return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(r"\.fuse:(\d+):(\d+): error\[(E\d+)\]", text)]


def write_spec(dirpath: Path, text: str, name: str = "spec.fuse") -> Path:
    p = dirpath / name
    p.write_text(text)
    return p


def run_cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run the real CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from fusionlang.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


sys.path.insert(0, str(Path(__file__).parent))


WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "red", "blue", "big", "small", "fast", "slow", "and", "but", "then", "it", "saw", "was", "is", "very", "quite", "happy", "sad", "one", "two", "three", "four", "green", "old", "new", "tall", "short"]


def word_tokenizer():
    """A word-level tokenizer over WORDS (no network), and its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    return fast, vocab


@pytest.fixture(scope="module")
def mk_family(tmp_path_factory):
    """(root, family) of the MergeKit comparisons: a tiny Llama base and three experts
    (noise 0.02, seed 11), one per test module. NOTE: at seed 11 no two task-vector
    magnitudes tie at a trim threshold, where MergeKit keeps whichever its unstable
    argsort puts first and fusionlang the first in flat order
    (docs/mergekit-semantics.md, "ties at the threshold")."""
    root = tmp_path_factory.mktemp("mk")
    return root, make_family(root, "llama", n_experts=3, noise=0.02, seed=11)


def word_llama(path: Path, seed: int, **sizes):
    """A tiny LlamaForCausalLM over the word tokenizer, initialised after
    torch.manual_seed(seed) and saved with the tokenizer to `path`; `sizes` override the
    config (hidden_size 16, intermediate_size 32, 2 layers, 2 heads, 2 key/value heads).
    Returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fast, vocab = word_tokenizer()
    config = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32,
              "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3} | sizes
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model


def make_causal_family(root: Path, n_experts: int = 2, rows: int = 30, seed: int = 0) -> dict[str, Path]:
    """Tiny LlamaForCausalLM models (base + noise experts) with the word-level tokenizer,
    and `lm.jsonl`: `rows` random sentences ("text")."""
    import json
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    fast, vocab = word_tokenizer()
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    out: dict[str, Path] = {}
    for i, name in enumerate(["base"] + [f"e{k}" for k in range(n_experts)]):
        g = torch.Generator().manual_seed(seed * 100 + i)
        m = LlamaForCausalLM(config)
        m.load_state_dict({k: v + (0.05 * torch.randn(v.shape, generator=g) if i and v.is_floating_point() else 0)
                           for k, v in state.items()})
        m.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        out[name] = root / name
    rng = random.Random(seed)
    with open(root / "lm.jsonl", "w") as f:
        f.writelines(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))}) + "\n" for _ in range(rows))
    out["lm"] = root / "lm.jsonl"
    return out


def make_classifier_family(root: Path, n_experts: int = 2, rows: int = 80, seed: int = 0, noise: float = 0.05,
                           dropout: float = 0.1) -> dict[str, Path]:
    """Tiny BertForSequenceClassification models (3 labels) with a word-level tokenizer
    saved beside them, and a JSON lines file of `rows` random sentences per expert
    (`data0.jsonl`, ... with "text" and "label"): base + noise experts, for the
    data-dependent methods. Returns {"base", "e0", ..., "data0", ...} paths."""
    import json
    import random

    from transformers import BertConfig, BertForSequenceClassification

    fast, vocab = word_tokenizer()
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=24, num_labels=3,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    base = BertForSequenceClassification(config).eval()
    out: dict[str, Path] = {}
    state = base.state_dict()
    for i, name in enumerate(["base"] + [f"e{k}" for k in range(n_experts)]):
        g = torch.Generator().manual_seed(seed * 100 + i)
        m = BertForSequenceClassification(config)
        m.load_state_dict({k: v + (noise * torch.randn(v.shape, generator=g) if i and v.is_floating_point() else 0)
                           for k, v in state.items()})
        m.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        out[name] = root / name
    rng = random.Random(seed)
    for k in range(n_experts):
        path = root / f"data{k}.jsonl"
        with open(path, "w") as f:
            for _ in range(rows):
                words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
                f.write(json.dumps({"text": " ".join(words), "label": rng.randrange(3)}) + "\n")
        out[f"data{k}"] = path
    return out


class ReferenceWorker:
    """A reference tool's python (FusionBench's venv) kept running for the session:
    `run(script, *args)` runs `python script args...` inside it (tests/reference/worker.py)
    and raises AssertionError with the reference's traceback when the job fails. One
    start-up for the session instead of one per test case; a job that fails or times out
    restarts the process for the next one."""

    def __init__(self, python: Path):
        self.python, self.proc, self.log = python, None, None

    def _start(self) -> None:
        import subprocess
        import tempfile

        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - the jobs' prints, read when one fails; closed with the process
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen([str(self.python), str(REPO / "tests/reference/worker.py")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def run(self, script: Path, *args: str, timeout: float = 600) -> None:
        import json
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        start = self.log.tell()
        self.proc.stdin.write(json.dumps({"script": str(script), "argv": [str(a) for a in args]}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"{script.name} {' '.join(map(str, args))}: the reference worker "
                                 f"{'timed out' if not ready else 'died'}")
        answer = json.loads(line)
        if not answer["ok"]:
            self.log.seek(start)
            printed = self.log.read()[-3000:]
            self.log.seek(0, 2)
            raise AssertionError(f"{script.name} failed:\n{printed}\n{answer['error']}")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.log.close()


FUSIONBENCH_PYTHON = Path(os.environ.get("FUSIONBENCH_PYTHON") or REPO / ".venv-fusionbench/bin/python")
# NOTE: on CI a missing FusionBench is a failure (the tests run and cannot start it), never a skip
needs_fusionbench = pytest.mark.skipif(not FUSIONBENCH_PYTHON.is_file() and not os.environ.get("CI"),
                                       reason="FusionBench not installed (bash .ci/install_fusionbench.sh)")
_workers: dict[Path, ReferenceWorker] = {}


def run_reference(python: Path, script: Path, *args: str, timeout: float = 600) -> None:
    """`python script args...` in the session's worker process for that python (started
    on first use, killed at the end of the session)."""
    worker = _workers.setdefault(python, ReferenceWorker(python))
    worker.run(script, *args, timeout=timeout)


def pytest_sessionfinish(session, exitstatus):
    for worker in _workers.values():
        worker.close()
