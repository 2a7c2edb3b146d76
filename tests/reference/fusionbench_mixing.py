"""FusionBench's own mixing / upscaling algorithms on tiny causal LMs.

Run with the FusionBench venv's python (.ci/install_fusionbench.sh):
    python fusionbench_mixing.py CONFIG.json
CONFIG: {"method": "depth_upscaling", "model": dir, "layer_indices": [int | "range(a,b)"],
"out": dir}: `DepthUpscalingForLlama` (SOLAR) over a `CausalLMPool` holding the model,
saving the upscaled model and its tokenizer to `out`."""

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
    raise SystemExit(f"unknown method {cfg['method']!r}")


if __name__ == "__main__":
    main()
