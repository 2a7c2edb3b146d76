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
output of the model on `input_ids`.
{"method": "wemoe", "base": dir, "experts": [dir, ...], "init_lambda", "router_hidden_layers",
"lr", "routers": file.safetensors, "steps": [[[text, ...] per expert] per step], "eval": [text, ...],
"out": file.safetensors}: a sequence-classification Llama made a WEMoE model as
FusionBench's `clip_weight_ensembling_moe` does (task arithmetic, each layer's mlp a
`WeightEnsemblingMoE`, batch_first, batch_reduce while training), its gates set to
`routers` (`model.layers.{i}.mlp.gate.*`), trained with FusionBench's `entropy_loss`
(gradients accumulated over the experts' batches, one Adam step per step), then run on
`eval` with batch_reduce off; saves the gates (`model.layers.{i}.mlp.gate.*`) and
`output.logits`."""

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
    if cfg["method"] == "wemoe":
        _wemoe(cfg)
        return
    raise SystemExit(f"unknown method {cfg['method']!r}")


def _wemoe(cfg: dict) -> None:
    from copy import deepcopy

    import torch
    from fusion_bench.method.we_moe.we_moe import entropy_loss
    from fusion_bench.models.we_moe import WeightEnsemblingMoE
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def load(d):
        return AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()

    base, experts = load(cfg["base"]), [load(d) for d in cfg["experts"]]
    tok = AutoTokenizer.from_pretrained(cfg["base"])
    # NOTE: FusionBench 0.2.33's own task_arithmetic_merge raises for two or more models
    # ("Tensor type mismatch ... expected Parameter, got Tensor": it adds state dicts of
    # Parameters and Tensors); its arithmetic, in its order, on plain tensors:
    model = deepcopy(base)
    with torch.no_grad():
        sd0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
        tv = None
        for e in experts:
            d = {k: v.detach() - sd0[k] for k, v in e.state_dict().items()}
            tv = d if tv is None else {k: tv[k] + d[k] for k in tv}
        model.load_state_dict({k: sd0[k] + tv[k] * cfg["init_lambda"] for k in sd0})
    model.requires_grad_(False)
    routers = load_file(cfg["routers"])
    for i, layer in enumerate(model.model.layers):
        moe = WeightEnsemblingMoE(hidden_size=base.config.hidden_size, base_model=base.model.layers[i].mlp,
                                  expert_models=[e.model.layers[i].mlp for e in experts],
                                  init_lambda=cfg["init_lambda"], batch_first=True,
                                  router_hidden_layers=cfg["router_hidden_layers"], batch_reduce=True)
        prefix = f"model.layers.{i}.mlp.gate."
        moe.gate.load_state_dict({k[len(prefix):]: v for k, v in routers.items() if k.startswith(prefix)})
        layer.mlp = moe
    gates = [p for n, p in model.named_parameters() if ".gate." in n]
    for p in gates:
        p.requires_grad_(True)
    opt = torch.optim.Adam(gates, lr=cfg["lr"])
    for batches in cfg["steps"]:
        for texts in batches:
            logits = model(**tok(texts, return_tensors="pt")).logits
            entropy_loss(logits).backward()
        opt.step()
        opt.zero_grad()
    for layer in model.model.layers:
        layer.mlp.batch_reduce = False
    with torch.no_grad():
        logits = model(**tok(cfg["eval"], return_tensors="pt")).logits
    out = {n: p.detach().contiguous() for n, p in model.named_parameters() if ".gate." in n}
    out["output.logits"] = logits.contiguous()
    save_file(out, cfg["out"])


if __name__ == "__main__":
    main()
