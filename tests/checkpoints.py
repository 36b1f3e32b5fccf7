"""finetune.py-style checkpoint directories of any adapter method, made without training."""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ext import adapters
from peft_ext.prompts import Prompter
from tiny import config_for

# finetune.py's adapter flags, small
OPTIONS = dict(
    target_modules=None, lora_r=4, lora_alpha=8, lora_dropout=0.0, num_virtual_tokens=4, bottleneck_size=8,
    non_linearity="tanh", adapter_dropout=0.0, use_parallel_adapter=False, use_adapterp=False, scaling=1.0,
    init_weights="bert", embedding_lambda=0.0, ffn=None,
)


def make_checkpoint(base: str, path: str, adapter_name: str = "lora", seed: int = 0, **options) -> str:
    """Write base + `adapter_name` to `path` as finetune.py would, with every adapter weight moved away from
    its init (LoRA starts as the identity, and merging an identity would test nothing)."""
    model = adapters.build(AutoModelForCausalLM.from_pretrained(base), adapter_name, {**OPTIONS, **options})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    Prompter.load("alpaca").save(path)
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump({"args": {"base_model": base, "adapter_name": adapter_name}}, f)
    return path


def save_wide_llama(base: str, path: str) -> str:
    """A LLaMA like `base` (same tokenizer) but with hidden size 48: no adapter of `base` fits it."""
    config = config_for("llama", len(AutoTokenizer.from_pretrained(base)))
    config.hidden_size, config.head_dim = 48, 12
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path
