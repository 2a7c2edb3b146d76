"""FusionBench 0.2.33's BitDelta on a tiny Llama base + fine-tune, on given text rows.

Run with the FusionBench venv's python (.ci/install_fusionbench.sh):
    python fusionbench_bitdelta.py CONFIG.json
CONFIG: {"base": dir, "model": dir, "texts": [rows], "params": {lr, batch_size,
num_steps, max_length}, "work": dir, "out": file.safetensors}.

FusionBench's own code does the work: `BitDeltaAlgorithm.run` (compress_diff /
BinaryDiff, its AdamW + cosine training loop on the logits' MSE, save_diff), its
`get_dataloader` (padding to max_length, default_data_collator), then its `load_diff`
applied to a fresh base model, whose state dict is saved to `out`. Replaced:
- `get_dataset` (it streams C4 from the network): the given rows, as a `datasets`
  Dataset with the columns FusionBench's loader removes;
- the model pool: an object with the four methods `run` calls;
- its triton kernel `binary_bmm` (CUDA only; triton is not installed on CPU): the exact
  product x · (2·unpack(mask) − 1) in float32, differentiable (the kernel rounds it to
  float16 and passes no gradient to x). `pack` / `unpack` are FusionBench's; a stand-in
  `triton` module is present only while its kernel module is imported.
"""

import json
import sys
import types

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def _import_bitdelta():
    # NOTE: what imports the real (absent) triton optionally (lightning, through
    # FusionBench's mixins) is imported first, without the stand-in
    import fusion_bench.mixins.lightning_fabric
    import fusion_bench.modelpool  # noqa: F401

    tri = types.ModuleType("triton")
    tl = types.ModuleType("triton.language")
    tl.constexpr = int
    tri.language = tl
    tri.autotune = lambda *a, **k: (lambda f: f)
    tri.jit = lambda f: f
    tri.Config = lambda *a, **k: None
    saved = {k: sys.modules.get(k) for k in ("triton", "triton.language")}
    sys.modules.update({"triton": tri, "triton.language": tl})
    try:
        import fusion_bench.method.bitdelta.bitdelta as algo
        from fusion_bench.method.bitdelta.bitdelta_utils import binary_gemm_kernel, diff
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return algo, binary_gemm_kernel, diff


class _Pool:
    def __init__(self, base, model):
        self.base, self.model, self.model_names = base, model, ["m0"]

    def load_tokenizer(self):
        return AutoTokenizer.from_pretrained(self.model)

    def load_pretrained_model(self):
        return AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)

    def load_model(self, name):
        return AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    from datasets import Dataset

    algo, kernel, diff = _import_bitdelta()

    def exact_bmm(a, b, n_bits=32, activation=""):
        return a @ (kernel.unpack(b, n_bits).to(a.dtype) * 2 - 1)

    diff.binary_bmm = exact_bmm
    rows = cfg["texts"]
    algo.get_dataset = lambda *a, **k: Dataset.from_dict(
        {"text": rows, "timestamp": [""] * len(rows), "url": [""] * len(rows)})
    p = cfg["params"]
    bd = algo.BitDeltaAlgorithm(save_dir=cfg["work"], save_full_model=False, lr=p["lr"], batch_size=p["batch_size"],
                                num_steps=p["num_steps"], max_length=p["max_length"])
    bd.run(_Pool(cfg["base"], cfg["model"]))
    base = AutoModelForCausalLM.from_pretrained(cfg["base"], dtype=torch.float32)
    diff.load_diff(base, f"{cfg['work']}/diff.pt")
    save_file({k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}, cfg["out"])


if __name__ == "__main__":
    main()
