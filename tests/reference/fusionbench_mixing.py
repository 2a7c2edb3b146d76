"""FusionBench's own mixing / upscaling algorithms on tiny causal LMs.

Run with the FusionBench venv's python (.ci/install_fusionbench.sh):
    python fusionbench_mixing.py CONFIG.json
CONFIG: {"method": "depth_upscaling", "model": dir, "layer_indices": [int | "range(a,b)"],
"out": dir}: `DepthUpscalingForLlama` (SOLAR) over a `CausalLMPool` holding the model,
saving the upscaled model and its tokenizer to `out`.
{"method": "smile", "base": dir, "experts": [dir, ...], "k", "gate_k", "top_k",
"routing_use_diff", "average_experts", "input_ids": [[int]], "out": file.safetensors}:
`SmileUpscalingAlgorithm.merge` over `AutoModel`s (FusionBench's own module classes),
saving the upscaled model's state dict and, under `output.*`, every floating-point
output of the model on `input_ids`."""

import json
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    if cfg["method"] == "depth_upscaling":
        from fusion_bench.method.depth_upscaling.depth_upscaling_for_llama import (
            DepthUpscalingForLlama,
        )
        from fusion_bench.modelpool import CausalLMPool

        pool = CausalLMPool(models={"_pretrained_": cfg["model"]}, tokenizer=cfg["model"])
        DepthUpscalingForLlama(layer_indices=cfg["layer_indices"], model_save_path=cfg["out"]).run(pool)
        return
    if cfg["method"] == "smile":
        import torch
        from fusion_bench.method.smile_upscaling.smile_upscaling import SmileUpscalingAlgorithm
        from safetensors.torch import save_file
        from transformers import AutoModel

        base = AutoModel.from_pretrained(cfg["base"]).eval()
        experts = [AutoModel.from_pretrained(d).eval() for d in cfg["experts"]]
        algo = SmileUpscalingAlgorithm(device="cpu", upscaling_accelerator=None, full_matrices=True, gate_k=cfg["gate_k"],
                                       k=cfg["k"], top_k=cfg["top_k"], routing_use_diff=cfg["routing_use_diff"],
                                       average_experts=cfg["average_experts"])
        with torch.no_grad():
            model = algo.merge(base, experts)
            out = model(input_ids=torch.tensor(cfg["input_ids"]))
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"output.{k}": v.detach().contiguous() for k, v in out.items()
                        if isinstance(v, torch.Tensor) and v.is_floating_point()})
        save_file(tensors, cfg["out"])
        return
    raise SystemExit(f"unknown method {cfg['method']!r}")


if __name__ == "__main__":
    main()
