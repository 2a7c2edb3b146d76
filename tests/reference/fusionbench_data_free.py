"""FusionBench 0.2.33's own data-free merging algorithms on tiny causal LMs.

Run with the FusionBench venv's python (.ci/install_fusionbench.sh):
    python fusionbench_data_free.py CONFIG.json
CONFIG: {"method": NAME, "base": dir, "models": [dirs], "out": file.safetensors, **params}.
Each algorithm's `run` gets a `BaseModelPool` of the loaded models ("_pretrained_" and
"m0", "m1", ...); the result's state dict is saved to `out` (several models: keys
prefixed "m0/", ...).

NAME and params (FusionBench's class, parameter names):
  tsvm:       TaskSingularVectorMerging(alpha, exclude_keys, return_single_task_models)
  iso_c:      IsotropicMergingInCommonSubspace(scaling_factor, exclude_keys)
  iso_cts:    IsotropicMergingInCommonAndTaskSubspace(scaling_factor, common_space_fraction, exclude_keys)
  magmax:     MagMaxAlgorithm(scaling_factor)
  tall_mask:  TallMaskTaskArithmeticAlgorithm(tall_mask_lambda): one model per task
  opcm:       OPCM(alpha, shuffle_order, ...) of opcm_general (see `_opcm`)
  emr:        EMRMerging(): the unified task vector, masks and rescalers, applied per
              task as its EMRTaskModulator does (θ0 + rescaler_t · mask_t ⊙ τ_uni)
  magnitude_diff_pruning: MagnitudeDiffPruningAlgorithm(prune_ratio, rescale,
              extract_names, prune_type) on one fine-tuned model
  prune_unstructured / prune_semistructured: the functions `MagnitudePruningForLlama`
              runs (llama_magnitude_prune.unstructured_magnitude_prune_ /
              semistructured_magnitude_prune_: every Linear weight of the decoder
              layers) on the first model; params sparsity_ratio / n, m.
"""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _pool(cfg):
    from fusion_bench.modelpool import BaseModelPool

    models = {"_pretrained_": _load(cfg["base"])}
    models.update({f"m{i}": _load(d) for i, d in enumerate(cfg["models"])})
    return BaseModelPool(models)


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    method = cfg.pop("method")
    out_path = cfg.pop("out")
    p = cfg.get("params", {})
    torch.set_grad_enabled(False)
    if method == "tsvm":
        from fusion_bench.method import TaskSingularVectorMerging

        res = TaskSingularVectorMerging(**p).run(_pool(cfg))
    elif method == "iso_c":
        from fusion_bench.method.isotropic_merging import IsotropicMergingInCommonSubspace

        res = IsotropicMergingInCommonSubspace(**p).run(_pool(cfg))
    elif method == "iso_cts":
        from fusion_bench.method.isotropic_merging import IsotropicMergingInCommonAndTaskSubspace

        res = IsotropicMergingInCommonAndTaskSubspace(**p).run(_pool(cfg))
    elif method == "magmax":
        from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

        res = MagMaxAlgorithm(**p).run(_pool(cfg))
    elif method == "tall_mask":
        from fusion_bench.method.tall_mask.task_arithmetic import TallMaskTaskArithmeticAlgorithm

        res = TallMaskTaskArithmeticAlgorithm(**p).run(_pool(cfg))["models"]
    elif method == "emr":
        res = _emr(cfg)
    elif method == "opcm":
        res = _opcm()(**p).run(_pool(cfg))
    elif method == "magnitude_diff_pruning":
        from fusion_bench.method.pruning.magnitude_diff_pruning import MagnitudeDiffPruningAlgorithm

        res = MagnitudeDiffPruningAlgorithm(**p).run(_pool(cfg))
    elif method in ("prune_unstructured", "prune_semistructured"):
        res = _prune(cfg, method, p)
    else:
        raise SystemExit(f"unknown method {method!r}")
    if isinstance(res, dict):
        tensors = {f"{name}/{k}": v for name, m in res.items() for k, v in _state(m).items()}
    else:
        tensors = _state(res)
    save_file(tensors, out_path)


def _emr(cfg) -> dict:
    from copy import deepcopy

    from fusion_bench.method.emr_merging.utils import emr_merge

    pool = _pool(cfg)
    base = pool.load_pretrained_model()
    sd0 = base.state_dict()
    tvs = [{k: v - sd0[k] for k, v in pool.load_model(n).state_dict().items()} for n in pool.model_names]
    unified, masks, rescalers = emr_merge(tvs)
    out = {}
    for i, name in enumerate(pool.model_names):
        m = deepcopy(base)
        # EMRTaskModulator: θ = θ0 + τ_uni ⊙ mask_i · rescaler_i
        m.load_state_dict({k: sd0[k] + unified[k] * masks[k][i] * rescalers[i] for k in sd0})
        out[name] = m
    return out


def _opcm():
    """FusionBench's general `OPCM` class (opcm_general.py). NOTE: the package
    fusion_bench.method.opcm imports its CLIP variant first, which fails under the
    transformers of FusionBench's venv (no CLIPVisionTransformer); an empty package
    module stands in for it so that opcm_general and its .utils import unchanged."""
    import os
    import types

    import fusion_bench.method as fm

    pkg = types.ModuleType("fusion_bench.method.opcm")
    pkg.__path__ = [os.path.join(os.path.dirname(fm.__file__), "opcm")]
    sys.modules.setdefault("fusion_bench.method.opcm", pkg)
    from fusion_bench.method.opcm.opcm_general import OPCM

    return OPCM


def _prune(cfg, method, p):
    from fusion_bench.method.pruning import llama_magnitude_prune as lmp

    model = _load(cfg["models"][0])
    if method == "prune_unstructured":
        return lmp.unstructured_magnitude_prune_(model, p["sparsity_ratio"], dtype=None, device="cpu")
    return lmp.semistructured_magnitude_prune_(model, p["n"], p["m"], dtype=None, device="cpu")


if __name__ == "__main__":
    main()
