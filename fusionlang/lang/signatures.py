"""Parameter tables of the builtins (local, hf, zoo, ramp, layers, slices, moe, classify,
tokenizer, per_model, dataset, zoo_data, gram, gram_plusplus, pruning_stats, bitdelta_stats, align,
wasserstein_barycenter, smile, wemoe, lora, merge_adapters, extract_lora, fisher, adamerging_coefficients, covered,
accuracy,
perplexity, exact_match, lm_eval, tune), the type lattice the checker uses, and rule patterns as regexes. No torch."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinSig:
    params: tuple[tuple[str, str, object], ...]  # (name, type, default or REQUIRED)
    returns: str
    doc: str


REQUIRED = object()
BUILTINS: dict[str, BuiltinSig] = {
    "local": BuiltinSig((("path", "string", REQUIRED),), "model",
                        "a model directory: config.json + *.safetensors (relative to the spec file)"),
    "hf": BuiltinSig((("repo", "string", REQUIRED), ("revision", "string", None)), "model",
                     "a model from the local Hugging Face cache (never downloaded)"),
    "zoo": BuiltinSig((("zoo", "string", REQUIRED), ("model", "string", "base")), "model",
                      "a model of a built zoo (`fusionlang zoo build NAME`): its base or a task's fine-tuned expert"),
    "package": BuiltinSig((("package", "string", REQUIRED), ("path", "string", "")), "model",
                          "a model directory shipped inside an installed Python package (its import name)"),
    "ramp": BuiltinSig((("start", "number", REQUIRED), ("end", "number", REQUIRED)), "number",
                       "a value interpolated linearly over the layer index (a MergeKit gradient)"),
    "layers": BuiltinSig((("model", "model", REQUIRED), ("start", "int", REQUIRED), ("end", "int", REQUIRED)),
                         "slice", "layers [start, end) of a model, for slices()"),
    "slices": BuiltinSig((("parts", "list", REQUIRED),), "model",
                         "stack layer ranges of models into a new model (passthrough)"),
    "classify": BuiltinSig((("task", "string", REQUIRED), ("zoo", "string", "text"), ("split", "string", "test"),
                            ("batch_size", "int", 128), ("limit", "int", None)), "task",
                           "a classification task of a model zoo: its data split, frozen head and accuracy"),
    "dataset": BuiltinSig((("path", "string", REQUIRED), ("text", "string", None), ("image", "string", None),
                           ("label", "string", None), ("format", "string", "auto"), ("split", "string", "train"),
                           ("n", "int", None), ("seed", "int", None), ("prompt", "string", None),
                           ("answer", "string", None)), "data",
                          "the user's own data, read with the `datasets` library: a JSON lines, JSON, CSV or parquet "
                          "file, or a directory written by save_to_disk; the columns named by text=, image=, label= "
                          "(and prompt=, answer= for exact_match()); the first n rows (or n rows drawn with seed)"),
    "zoo_data": BuiltinSig((("task", "string", REQUIRED), ("zoo", "string", "text"), ("split", "string", "train"),
                            ("n", "int", None), ("seed", "int", None)), "data",
                           "a split of a zoo task's data (its inputs, labels and frozen head; for the LLM zoo a "
                           "domain's text, prompts and answers); n rows drawn with seed"),
    "gram": BuiltinSig((("models", "models", REQUIRED), ("data", "data", REQUIRED), ("batch_size", "int", 32),
                        ("include_padding", "bool", False)), "stats",
                       "a model stage: for each model, the Gram matrix of every Linear (and Conv2d) layer's input "
                       "over `data` (one data value, or one per model); padded positions left out unless "
                       "include_padding (FusionBench counts them)"),
    "fisher": BuiltinSig((("models", "models", REQUIRED), ("data", "data", REQUIRED), ("batch_size", "int", 32),
                          ("normalize", "bool", True), ("minimal", "number", 1e-6), ("batch_order", "string", "length")),
                         "stats",
                         "a model stage: for each model, its diagonal Fisher information over `data` from the "
                         "model's own predictions, as Fisher-merging weights; batches of rows of similar length "
                         "(batch_order=\"length\") or in the data's order (\"given\")"),
    "gram_plusplus": BuiltinSig((("models", "models", REQUIRED), ("data", "data", REQUIRED), ("alpha", "number", 0.95),
                                 ("batch_size", "int", 32), ("include_padding", "bool", False)), "stats",
                                "a model stage: RegMean++'s Gram matrices, each layer's taken on the inputs the merged "
                                "layers below it produce (one data value per model)"),
    "pruning_stats": BuiltinSig(
        (("models", "models", REQUIRED), ("data", "data", REQUIRED), ("method", "string", "wanda"),
         ("prune_type", "string", "unstructured"), ("sparsity_ratio", "number", 0.5), ("n", "int", 2), ("m", "int", 4),
         ("blocksize", "int", 128), ("percdamp", "number", 0.01), ("batch_size", "int", 8),
         ("include_padding", "bool", False)), "stats",
        "a model stage: Wanda's (method=\"wanda\": mean squared input per feature) or SparseGPT's (\"sparsegpt\": "
        "Gram matrix) statistics of every Linear input of the layer stack, each layer measured on the outputs of "
        "the layers below it as pruned with the same arguments"),
    "bitdelta_stats": BuiltinSig(
        (("base", "model", REQUIRED), ("model", "model", REQUIRED), ("data", "data", REQUIRED), ("lr", "number", 1e-4),
         ("batch_size", "int", 4), ("num_steps", "int", 100), ("max_length", "int", 128),
         ("calibrate", "string", "all")), "stats",
        "a model stage: BitDelta's compression of model − base to one sign bit and one scale per Linear weight of "
        "the layer stack, the scales (calibrate=\"all\": every parameter) trained to match the model's logits on "
        "`data`; per tensor, the scale or the calibrated value"),
    "adamerging_coefficients": BuiltinSig(
        (("base", "model", REQUIRED), ("models", "models", REQUIRED), ("data", "data", REQUIRED),
         ("mode", "string", "task"), ("steps", "int", 1000), ("lr", "number", 0.001), ("init", "number", 0.3),
         ("batch_size", "int", 16), ("clamp", "bool", False), ("seed", "int", 0)), "stats",
        "a model stage: AdaMerging's task-arithmetic coefficients, learned by minimising the entropy of the "
        "merged model's predictions on `data` (one value per model); per tensor, the vector of n coefficients"),
    "align": BuiltinSig((("model", "model", REQUIRED), ("to", "model", REQUIRED), ("data", "data", None),
                         ("method", "string", "weight"), ("soft", "bool", False), ("reg", "number", 0.01),
                         ("axes", "list", None), ("max_iter", "int", 100), ("seed", "int", 0),
                         ("batch_size", "int", 32), ("max_samples", "int", 20000)), "model",
                        "a model stage: `model` with its hidden units (MLP neurons, CNN channels with their "
                        "BatchNorm statistics, attention heads) permuted to match `to`'s, the same function: "
                        "Git Re-Basin weight matching (method=\"weight\"), or OT fusion's transport maps "
                        "(\"emd\" exact, \"sinkhorn\" entropic with reg) from activations on `data` or from "
                        "weights; soft keeps OT's soft map (not function-preserving); axes picks kinds of units"),
    "wasserstein_barycenter": BuiltinSig(
        (("models", "models", REQUIRED), ("data", "data", None), ("weights", "numbers", None),
         ("solver", "string", "emd"), ("soft", "bool", False), ("reg", "number", 0.01), ("axes", "list", None),
         ("max_iter", "int", 100), ("seed", "int", 0), ("batch_size", "int", 32), ("max_samples", "int", 20000),
         ("reset_bn", "bool", False)),
        "model",
        "a model stage: N models fused through a Wasserstein barycenter, layer by layer: each set of units' "
        "free-support barycenter (of activations on `data`, or of weights), every model transported onto it, "
        "the transported models averaged with `weights`; reset_bn re-estimates BatchNorm statistics on `data`"),
    "covered": BuiltinSig((("stats", "stats", REQUIRED),), "bool",
                          "whether every statistic of the list has a value for the tensor being merged"),
    "accuracy": BuiltinSig((("data", "data", REQUIRED), ("batch_size", "int", 32)), "task",
                           "a task on your own labeled data: the accuracy of each model's own classification head"),
    "perplexity": BuiltinSig((("data", "data", REQUIRED), ("batch_size", "int", 8)), "task",
                             "a task on your own text: each causal language model's perplexity (lower is better)"),
    "exact_match": BuiltinSig((("data", "data", REQUIRED), ("batch_size", "int", 16),
                               ("max_new_tokens", "int", None)), "task",
                              "a task on your own prompts and answers: the fraction of rows a causal language model's "
                              "greedy continuation answers exactly (higher is better)"),
    "lm_eval": BuiltinSig((("task", "string", REQUIRED), ("metric", "string", None), ("limit", "int", None),
                           ("num_fewshot", "int", None), ("batch_size", "int", 8)), "task",
                          "a task of your own lm-evaluation-harness YAML (its data beside it), scored on causal "
                          "language models in memory: the YAML's first metric, or `metric`"),
    "ensemble": BuiltinSig((("models", "models", REQUIRED), ("weights", "numbers", None), ("normalize", "bool", True),
                            ("mode", "string", "mean")), "ensemble",
                           "a prediction-level combination of models (no merged weights): the mean of their outputs, "
                           "weighted (weights, divided by their sum with normalize), or their elementwise max "
                           "(mode=\"max\")"),
    "per_model": BuiltinSig((("values", "list", REQUIRED),), "number",
                            "one value per model, for a method argument it applies to each model in turn "
                            "(MergeKit's per-model parameters): density=per_model([0.5, 0.3]) with two models; "
                            "an element may be a gradient over the layers"),
    "tokenizer": BuiltinSig((("merge", "model", REQUIRED), ("source", "any", "union"), ("base", "model", None),
                             ("pad_to_multiple_of", "int", None), ("chat_template", "any", None)), "model",
                            "a merge of models whose vocabularies differ (MergeKit's tokenizer_source): the output "
                            "tokenizer is the union of the models' tokens (source=\"union\"), the base's "
                            "(\"base\") or a given model's, and every embedding and LM-head row is aligned by "
                            "token before merging; the whole value of a merge"),
    "moe": BuiltinSig((("base", "model", REQUIRED), ("experts", "models", REQUIRED), ("positive_prompts", "list", None),
                       ("negative_prompts", "list", None), ("gate_mode", "string", "hidden"),
                       ("experts_per_token", "int", 2), ("noise_scale", "any", None), ("residual_scale", "any", None),
                       ("shared_expert", "model", None), ("shared_prompts", "list", None),
                       ("architecture", "string", "auto"), ("layout", "string", "auto"),
                       ("router_dtype", "string", "float32"), ("allow_identical", "bool", False), ("seed", "int", 0)),
                      "model",
                      "a mixture of experts built from dense models (mergekit-moe): every tensor of `base` but "
                      "its MLPs, each layer's MLP replaced by the experts' MLPs and a router initialised from "
                      "each expert's prompts (gate_mode); the whole value of a merge"),
    "smile": BuiltinSig((("base", "model", REQUIRED), ("experts", "models", REQUIRED), ("k", "int", 128),
                         ("gate_k", "int", 1), ("top_k", "int", 1), ("routing_use_diff", "bool", True),
                         ("average_experts", "bool", False), ("linears", "list", None)),
                        "model",
                        "SMILE upscaling (FusionBench smile_upscaling): each Linear layer of `base` keeps its weights "
                        "and gains the experts' task vectors as rank-k experts with an SVD router (top_k per token); "
                        "data-free; the whole value of a merge, loaded with fusionlang.load"),
    "wemoe": BuiltinSig((("base", "model", REQUIRED), ("experts", "models", REQUIRED), ("data", "data", REQUIRED),
                         ("init_lambda", "number", 0.3), ("router_hidden_layers", "int", 2), ("lr", "number", 1e-4),
                         ("steps", "int", 1000), ("batch_size", "int", 16), ("batch_reduce", "bool", True),
                         ("seed", "int", 0)),
                        "model",
                        "a weight-ensembling mixture of experts (FusionBench weight_ensembling_moe): task arithmetic "
                        "outside the MLPs; each MLP's weights merged per input from the experts' task vectors by a "
                        "router trained on the unlabeled `data`; the whole value of a merge, loaded with "
                        "fusionlang.load"),
    "lora": BuiltinSig((("base", "model", REQUIRED), ("path", "string", REQUIRED), ("scale", "number", 1.0)), "model",
                       "`base` with a PEFT LoRA adapter directory merged in, tensor by tensor (MergeKit's "
                       "model+lora, PEFT's merge_and_unload): W + scale·(lora_alpha/r)·B·A; the adapter's "
                       "modules_to_save replace the base's tensors"),
    "merge_adapters": BuiltinSig((("adapters", "list", REQUIRED), ("weights", "numbers", REQUIRED),
                                  ("combination_type", "string", "svd"), ("svd_rank", "int", None),
                                  ("svd_clamp", "number", None), ("svd_full_matrices", "bool", True),
                                  ("density", "number", None), ("majority_sign_method", "string", "total"),
                                  ("seed", "int", 0)), "model",
                                 "PEFT LoRA adapters merged in adapter space (PEFT's add_weighted_adapter): "
                                 "their factors combined (linear, ties, dare_linear, dare_ties, magnitude_prune; "
                                 "cat side by side) or their updates combined and factored again (svd and the "
                                 "*_svd variants); the whole value of a merge, saved as a PEFT adapter"),
    "extract_lora": BuiltinSig((("base", "model", REQUIRED), ("model", "model", REQUIRED), ("max_rank", "int", 128),
                                ("distribute_scale", "bool", True), ("embed_lora", "bool", False),
                                ("modules_to_save", "list", None), ("include", "list", None),
                                ("exclude", "list", None), ("sv_epsilon", "number", 0.0),
                                ("skip_undecomposable", "bool", False)), "model",
                               "a PEFT LoRA adapter of `model`'s fine-tune of `base` (mergekit-extract-lora): the "
                               "SVD of each Linear layer's task vector cut to max_rank; embeddings, norms and "
                               "modules_to_save at full rank; the whole value of a merge, saved as "
                               "adapter_model.safetensors + adapter_config.json"),
    "tune": BuiltinSig((("values", "any", REQUIRED), ("on", "any", REQUIRED), ("split", "string", "val"),
                        ("budget", "int", None), ("sampler", "string", None), ("seed", "int", None),
                        ("objectives", "list", None), ("pick", "string", None)), "number",
                       "a merge argument chosen at run time on the tasks' validation split: the candidate with the "
                       "best mean accuracy (a grid), or with budget= a search (optuna: tpe, gp, cmaes, random, "
                       "nsga2) over a list or a between() range, on one or several objectives"),
    "between": BuiltinSig((("low", "number", REQUIRED), ("high", "number", REQUIRED), ("log", "bool", False)),
                          "range", "a continuous range [low, high] for tune() to search (optuna's suggest_float; "
                          "log=true searches log(x))"),
}

_TYPE_OK = {
    "model": {"model"},
    "models": {"models"},
    "number": {"number", "int", "numbers"},  # a list of numbers is a gradient over layers
    "int": {"int", "number"},
    "string": {"string"},
    "bool": {"bool"},
    "numbers": {"numbers", "list"},
    "list": {"list", "numbers", "models"},
    "any": None,
    "tensor": {"model"},
    "tensors": {"models", "stats"},  # statistics are model-shaped: ops take them like models
    "task": {"task"},
    "data": {"data", "list"},  # one data value, or one per model
    "stats": {"stats"},
    "ensemble": {"ensemble"},
}


def type_accepts(expected: str, actual: str) -> bool:
    if actual == "any" or expected == "any":
        return True
    ok = _TYPE_OK.get(expected)
    return ok is None or actual in ok


def pattern_regex(pattern: str) -> tuple[str, tuple[str, ...]]:
    """Glob over tensor names -> regex. `*` spans dots; `{i}` captures a layer index.
    A pattern matches a whole name or a dot-separated suffix of it."""
    out, caps, pos = [], [], 0
    for m in re.finditer(r"\*|\{([A-Za-z_][A-Za-z0-9_]*)\}", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        if m.group(0) == "*":
            out.append(".*")
        else:
            name = m.group(1)
            out.append(f"(?P<{name}>\\d+)" if name not in caps else f"(?P={name})")
            caps.append(name)
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return "(?:^|.*\\.)" + "".join(out) + "$", tuple(dict.fromkeys(caps))
