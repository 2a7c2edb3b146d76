"""The tiny fp32 Llama zoo the example YAMLs were tested on.

    python make_tiny_zoo.py ZOO_DIR     -> ZOO_DIR/base, ZOO_DIR/expert_1..3

base: LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)) with
torch.manual_seed(0); expert_i = base + 0.01 * N(0, 1) per parameter (generator seed i).
"""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(out: str) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(f"{out}/base", safe_serialization=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in (1, 2, 3):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k] + 0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(f"{out}/expert_{i}", safe_serialization=True)


if __name__ == "__main__":
    main(sys.argv[1])
