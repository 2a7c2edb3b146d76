"""FusionBench 0.2.33's Wanda and SparseGPT pruning of a tiny Llama, on given token ids.

Run with the FusionBench venv's python (.ci/install_fusionbench.sh):
    python fusionbench_pruning.py CONFIG.json
CONFIG: {"method": "wanda" | "sparsegpt", "model": dir, "input_ids": [[ids] per sample,
all of one length], "params": {prune_type, sparsity_ratio, n, m}, "out": file.safetensors}.

FusionBench's own code does the work: `prepare_calibration_input` (its Catcher on the
first layer) and the class's `prune_using_calibration_data_` (WandaPruningForLlama /
SparseGPTPruningForLlama), with `nsamples` = the number of samples. Only what FusionBench
reads from C4 (`get_loaders("c4")`, network) is replaced by the given token ids, one
sample per batch as its loader gives them. Shims for the installed transformers (5.x),
each leaving FusionBench's arithmetic unchanged:
- its loops call each decoder layer with attention_mask and position_ids only, and
  transformers 5's layers need the rotary `position_embeddings` too: each layer's forward
  computes them from position_ids with the model's own rotary embedding;
- SparseGPT reads `model.hf_device_map` (absent without accelerate's device map: an
  empty map) and calls `torch.cuda.synchronize()` (a no-op on CPU here).
"""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    from fusion_bench.method.pruning.wanda_utils.prune import prepare_calibration_input

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32).eval()
    ids = cfg["input_ids"]
    model.seqlen = len(ids[0])
    rotary = model.model.rotary_emb
    for layer in model.model.layers:
        def forward(hidden_states, attention_mask=None, position_ids=None, _orig=layer.forward, **kw):
            return _orig(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                         position_embeddings=rotary(hidden_states, position_ids), **kw)
        layer.forward = forward
    loader = [(torch.tensor([row]), None) for row in ids]
    inps, outs, attention_mask, position_ids = prepare_calibration_input(model, loader, "cpu")
    p = {"nsamples": len(ids), "seed": 0, "use_variant": False, "device": "cpu", "dtype": None, **cfg["params"]}
    if cfg["method"] == "wanda":
        from fusion_bench.method import WandaPruningForLlama

        algo = WandaPruningForLlama(**p)
    else:
        from fusion_bench.method import SparseGPTPruningForLlama

        model.hf_device_map = {}
        torch.cuda.synchronize = lambda *a, **k: None
        algo = SparseGPTPruningForLlama(**p)
    algo.prune_using_calibration_data_(model, inps=inps, outs=outs, attention_mask=attention_mask,
                                       position_ids=position_ids)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, cfg["out"])


if __name__ == "__main__":
    main()
