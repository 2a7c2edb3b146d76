"""FusionBench's own data-dependent merging functions on tiny sequence classifiers.

Run with the FusionBench venv's python (.ci/install_fusionbench.sh):
    python fusionbench_data_methods.py CONFIG.json
CONFIG: {"method": "regmean" | "fisher", "models": [dirs], "data": [jsonl per model],
"n": rows, "batch_size": B, "alpha": reduce_non_diagonal_ratio, "out": file.safetensors}.
Batches are the first n rows of each data file in order, tokenized per batch with the
model's tokenizer (padding to the longest row, truncation at max_position_embeddings),
as a minimal stand-in for the HF Trainer whose three members the functions use."""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging
from fusion_bench.method.regmean.regmean import regmean_merging


class Batches:
    """What regmean_merging / fisher_merging read from a transformers Trainer."""

    def __init__(self, batches, batch_size):
        self.batches, self._train_batch_size = batches, batch_size

    def get_train_dataloader(self):
        return list(self.batches)

    def _prepare_inputs(self, inputs):
        return inputs


def main() -> None:
    cfg = json.load(open(sys.argv[1]))
    n, bs = cfg["n"], cfg["batch_size"]
    models = [AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval() for d in cfg["models"]]
    trainers = []
    for d, path in zip(cfg["models"], cfg["data"]):
        tok = AutoTokenizer.from_pretrained(d)
        texts = [json.loads(line)["text"] for line in open(path) if line.strip()][:n]
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
