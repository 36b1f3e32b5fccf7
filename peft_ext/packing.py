"""Padding-free training batches: a micro batch becomes one row of its examples, each attending only to itself.

A padded micro batch computes every layer on `rows × longest` tokens; a packed one on the real tokens alone.
transformers' `DataCollatorWithFlattening` builds the row (position ids restart at 0 per example, the first
label of every example is -100 so no example learns to predict the next one) and the boundaries
(`cu_seq_lens_q`). Its attention, though, must not look across examples. transformers' sdpa does that on a CPU
by building one dense block-diagonal mask over the whole row, slower than padding; the attention here instead
runs causal SDPA on each example's slice, which is exactly the attention the example gets in a padded batch.

The attention is switched on around the forward pass of a packed batch only (`attention_for`), so evaluation,
generation and every saved config see the model's own implementation.
"""
import contextlib
from itertools import pairwise

import torch
from transformers import AttentionInterface, DataCollatorWithFlattening

IMPLEMENTATION = "per_example_causal"

# Families whose attention layers take their implementation from AttentionInterface and receive the model's
# keyword arguments (the collator's cu_seq_lens_q), read in transformers 5.23's modeling code and checked by
# tests/test_train_throughput.py. bloom, gptj and gpt_neo compute attention themselves.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox"})
# Adapters that act on each token on its own. Prompt-learning methods (prefix, prompt, p-tuning) prepend
# virtual tokens to every row, which one row holding several examples would share.
PEFT_TYPES = frozenset({"LORA", "IA3", "BOTTLENECK"})


def per_example_causal_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, sliding_window=None,
    **kwargs,
):
    """Causal attention within each packed example; (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    if cu_seq_lens_q is None or attention_mask is not None:
        raise ValueError(f"{IMPLEMENTATION} attention needs a packed batch (cu_seq_lens_q) and no attention mask")
    lengths = [b - a for a, b in pairwise(cu_seq_lens_q.tolist())]
    if sliding_window is not None and max(lengths) > sliding_window:
        raise ValueError(f"{IMPLEMENTATION} attention does not apply a sliding window; an example is longer than it")
    gqa = query.shape[1] != key.shape[1]
    # split, not slices: the backward of a slice fills a zero tensor of the whole row for every example
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa,
        )
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


# Not registered as a mask function as well: for an implementation without one, transformers builds no mask.
AttentionInterface.register(IMPLEMENTATION, per_example_causal_attention)


def supports(model, longest: int) -> bool:
    """Whether packed batches give `model` (a PeftModel) the same loss as padded ones, for examples up to `longest`."""
    config = model.get_base_model().config
    window = getattr(config, "sliding_window", None)
    return (
        config.model_type in FAMILIES
        and model.active_peft_config.peft_type.value in PEFT_TYPES
        and (window is None or longest <= window)
    )


def faster(model) -> bool:
    """Whether packing saves time where `model` runs: on a CPU, whose time grows with every token computed, and
    not on a GPU. There, on an H200 (LLaMA-7B shape, LoRA, cutoff 256, micro batch 4), packed micro batches
    trained at 0.39× the alpaca-lora setup's speed with this attention (which reads the boundaries back in every
    layer) and at 0.83× with transformers' block-diagonal mask, while length-sorted padded ones ran at 1.04-1.46×
    (benchmarks/README.md)."""
    return model.device.type == "cpu"  # measured faster there; on GPUs slower, elsewhere unmeasured


@contextlib.contextmanager
def attention_for(model):
    """Run `model` with the per-example attention inside the block, and its own implementation after."""
    config = model.get_base_model().config
    own = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = own


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens_q" in batch


class PackingCollator:
    """Examples -> one packed row, plus an all-ones attention mask.

    The mask is there for the Trainer's count of real tokens (`include_num_input_tokens_seen="non_padding"`
    counts it, and token ids may equal the pad id); the model never sees it (AdapterTrainer.compute_loss).
    """

    def __init__(self):
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=True)

    def __call__(self, features):
        batch = self.flatten(features)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch
