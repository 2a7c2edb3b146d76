"""FusionBench's own data-dependent merging functions on tiny sequence classifiers.

Run with the FusionBench venv's python (.ci/install_fusionbench.sh):
    python fusionbench_data_methods.py CONFIG.json
CONFIG: {"method": "regmean" | "fisher" | "adamerging", "models": [dirs], "data": [jsonl per
model], "n": rows, "batch_size": B, "alpha": reduce_non_diagonal_ratio, "out": file.safetensors;
adamerging: "base", "mode" (task | layer), "steps", "lr", "init", "seed"}.
Batches are the first n rows of each data file in order, tokenized per batch with the
model's tokenizer (padding to the longest row, truncation at max_position_embeddings),
as a minimal stand-in for the HF Trainer whose three members the functions use."""

import json
import sys

import torch
from fusion_bench.method.adamerging.entropy_loss import entropy_loss
from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging
from fusion_bench.method.regmean.regmean import regmean_merging
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def _lines(path) -> list[str]:
    with open(path) as f:
        return [line for line in f if line.strip()]


class Batches:
    """What regmean_merging / fisher_merging read from a transformers Trainer."""

    def __init__(self, batches, batch_size):
        self.batches, self._train_batch_size = batches, batch_size

    def get_train_dataloader(self):
        return list(self.batches)

    def _prepare_inputs(self, inputs):
        return inputs


def batch_order(n_rows, batch_size, seed, i):
    """The row order fusionlang's AdaMerging stage documents (a shuffled DataLoader per
    data value, from a generator seeded with seed * 1_000_003 + i)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    while True:
        perm = torch.randperm(n_rows, generator=g).tolist()
        for start in range(0, n_rows, batch_size):
            yield perm[start:start + batch_size]


def adamerging(cfg) -> dict:
    """FusionBench's TaskWiseAdaMergingAlgorithm / LayerWise test_time_adaptation loop,
    with its own merged-model wrappers and entropy loss, on the given batches."""
    from fusion_bench.models.wrappers.layer_wise_fusion import (
        LayerWiseMergedModel,
        get_layer_wise_weights,
    )
    from fusion_bench.models.wrappers.task_wise_fusion import (
        TaskWiseMergedModel,
        get_task_wise_weights,
    )

    load = lambda d: AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32)
    pretrained = load(cfg["base"])
    finetuned = [load(d) for d in cfg["models"]]
    n = len(finetuned)
    if cfg["mode"] == "task":
        module = TaskWiseMergedModel(task_wise_weight=get_task_wise_weights(n, cfg["init"]), pretrained_model=pretrained,
                                     finetuned_models=finetuned, clamp_weights=False, tie_weights=True, strict=False)
    else:
        layers = len([p for p in pretrained.parameters() if p.requires_grad])
        module = LayerWiseMergedModel(layer_wise_weight=get_layer_wise_weights(n, layers, cfg["init"]),
                                      pretrained_model=pretrained, finetuned_models=finetuned, clamp_weights=False,
                                      tie_weights=True, strict=False)
    tok = AutoTokenizer.from_pretrained(cfg["base"])
    texts = [[json.loads(line)["text"] for line in _lines(p)][:cfg["n"]] for p in cfg["data"]]
    streams = [batch_order(len(t), cfg["batch_size"], cfg["seed"], i) for i, t in enumerate(texts)]
    maxlen = pretrained.config.max_position_embeddings
    optimizer = torch.optim.Adam([module.merge_weight], lr=cfg["lr"])
    module.train()
    module.merge_weights()
    for _ in range(cfg["steps"]):
        for i in range(n):
            idx = next(streams[i])
            batch = tok([texts[i][k] for k in idx], padding=True, truncation=True, max_length=maxlen,
                        return_tensors="pt")
            logits = module(**batch).logits
            entropy_loss(logits).backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()
    merged = module.merge_and_unload()
    return dict(merged.named_parameters())


def ensemble(cfg) -> dict:
    """FusionBench's EnsembleModule / WeightedEnsembleModule / MaxModelPredictor on the
    models: their combined outputs' logits for all rows of the first data file, as one batch."""
    from fusion_bench.models.wrappers.ensemble import (
        EnsembleModule,
        MaxModelPredictor,
        WeightedEnsembleModule,
    )

    models = [AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval() for d in cfg["models"]]
    if cfg["mode"] == "max":
        module = MaxModelPredictor(models)
    elif cfg.get("weights") is None:
        module = EnsembleModule(models)
    else:
        module = WeightedEnsembleModule(models, weights=cfg["weights"], normalize=cfg.get("normalize", True))
    tok = AutoTokenizer.from_pretrained(cfg["models"][0])
    texts = [json.loads(line)["text"] for line in _lines(cfg["data"][0])][:cfg["n"]]
    batch = tok(texts, padding=True, truncation=True, max_length=models[0].config.max_position_embeddings,
                return_tensors="pt")
    with torch.no_grad():
        out = module(**batch)
    return {"logits": out["logits"], **{k: v for k, v in batch.items()}}


def regmean_plusplus(cfg) -> dict:
    """FusionBench's RegMeanAlgorithmPlusPlus.run, through its CLIP subclass (whose hooked
    get_regmean_weights it reuses) with the model-specific steps written for BERT the way
    the CLIP ones are: embeddings averaged, the first layer's inputs from the merged
    embeddings, `bert.encoder.layer` as the stack. Rows must need no padding (the layers
    run without an attention mask, as FusionBench's CLIP layers do)."""
    from collections import defaultdict

    from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import (
        RegMeanAlgorithmForCLIPPlusPlus,
    )
    from fusion_bench.modelpool import BaseModelPool

    tok = AutoTokenizer.from_pretrained(cfg["models"][0])
    texts = {f"m{i}": [json.loads(line)["text"] for line in _lines(p)][:cfg["n"]]
             for i, p in enumerate(cfg["data"])}
    bs = cfg["batch_size"]

    class Pool(BaseModelPool):
        def load_train_dataset(self, name, *args, **kwargs):
            return texts[name]

    from bidict import bidict
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus

    class BertPlusPlus(RegMeanAlgorithmForCLIPPlusPlus):
        # NOTE: FusionBench 0.2.33's CLIP class declares this mapping as a plain dict, which its
        # own serialization mixin cannot invert (instantiating it raises AttributeError)
        _config_mapping = bidict({**RegMeanAlgorithmPlusPlus._config_mapping, "_dataloader_kwargs": "dataloader_kwargs"})

        def on_regmean_start(self):
            pass

        def merge_embedding_layer(self, models_to_merge_dict):
            params = defaultdict(list)
            for m in models_to_merge_dict.values():
                for k, v in m.state_dict().items():
                    if k.startswith("bert.embeddings") and v.is_floating_point():
                        params[k].append(v)
            return {k: torch.stack(v).mean(dim=0) for k, v in params.items()}

        def get_input_for_first_layer(self, model, train_dataset):
            out = []
            for i in range(0, len(train_dataset), bs):
                batch = tok(train_dataset[i:i + bs], return_tensors="pt")
                assert bool(batch["attention_mask"].all()), "rows of equal length only"
                out.append(model.bert.embeddings(input_ids=batch["input_ids"],
                                                 token_type_ids=batch.get("token_type_ids")).detach())
            return out

        def get_layers(self, model):
            return model.bert.encoder.layer

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            for key, value in new_merged_params.items():
                merged_params_dict[f"bert.encoder.layer.{layer_idx}.{key}"] = value
            return merged_params_dict

        def layer_batches_forward(self, layer, batches_input):
            outs = []
            for b in batches_input:
                y = layer(b)
                outs.append((y[0] if isinstance(y, tuple) else y).detach())
            return outs

    models = {f"m{i}": AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
              for i, d in enumerate(cfg["models"])}
    models["_pretrained_"] = AutoModelForSequenceClassification.from_pretrained(cfg["base"], dtype=torch.float32).eval()
    algo = BertPlusPlus(num_regmean_examples=cfg["n"], exclude_param_names_regex=[],
                        reduce_non_diagonal_ratio=cfg["alpha"], weight_transpose=True,
                        dataloader_kwargs={"batch_size": bs})
    merged = algo.run(Pool(models))
    return dict(merged.named_parameters())


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    if cfg["method"] == "regmean_plusplus":
        save_file({k: v.detach().contiguous() for k, v in regmean_plusplus(cfg).items()}, cfg["out"])
        return
    if cfg["method"] == "ensemble":
        save_file({k: v.contiguous() for k, v in ensemble(cfg).items()}, cfg["out"])
        return
    if cfg["method"] == "adamerging":
        merged = adamerging(cfg)
        save_file({k: v.detach().contiguous() for k, v in merged.items()}, cfg["out"])
        return
    n, bs = cfg["n"], cfg["batch_size"]
    models = [AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval() for d in cfg["models"]]
    trainers = []
    for d, path in zip(cfg["models"], cfg["data"]):
        tok = AutoTokenizer.from_pretrained(d)
        texts = [json.loads(line)["text"] for line in _lines(path)][:n]
        maxlen = models[0].config.max_position_embeddings
        batches = [dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=maxlen, return_tensors="pt"))
                   for i in range(0, n, bs)]
        trainers.append(Batches(batches, bs))
    if cfg["method"] == "regmean":
        merged = regmean_merging(models, trainers, exclude_param_names_regex=[], nums_regmean_examples=[n] * len(models),
                                 reduce_non_diagonal_ratio=cfg["alpha"])
    else:
        merged = fisher_merging(models, trainers, exclude_param_names_regex=[], nums_fisher_examples=[n] * len(models),
                                normalize_fisher_weight=cfg.get("normalize", True),
                                minimal_fisher_weight=cfg.get("minimal", 1e-6))
    save_file({k: v.detach().contiguous() for k, v in merged.items()}, cfg["out"])


if __name__ == "__main__":
    main()
