"""Trainable-parameter counts of the paper's settings, on the meta device from configs alone (no weights).

`python tests/test_param_counts.py` prints the table that docs/adapters.md shows.
"""
import os
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from peft_ext import adapters  # noqa: E402

# The published shapes of the three base models.
MODELS = {
    "LLaMA-7B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, vocab_size=32000,
    ),
    "BLOOM-7.1B": dict(model_type="bloom", hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880),
    "GPT-J-6B": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400),
}
LORA_R8 = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
LORA_R32 = {"lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.05}
B = 256  # bottleneck size

# (model, setting, adapter_name, options, the count by hand). L layers, d hidden, f MLP width.
# LoRA r on a d_in → d_out layer: r·(d_in + d_out); a serial bottleneck on a d-wide side: 2·d·b;
# a parallel one on d_in → d_out: b·(d_in + d_out).
SETTINGS = [
    ("LLaMA-7B", "LoRA r=8 on q,v (seed README: 4.2M)", "lora", {**LORA_R8, "target_modules": "q_proj,v_proj"},
     32 * 2 * 8 * (4096 + 4096)),
    ("LLaMA-7B", "LoRA r=32 on q,k,v,up,down (paper)", "lora",
     {**LORA_R32, "target_modules": "q_proj,k_proj,v_proj,up_proj,down_proj"},
     32 * 32 * (3 * (4096 + 4096) + 2 * (4096 + 11008))),
    ("LLaMA-7B", "AdapterH: bottleneck 256 on gate,up,down (seed README: 200M)", "bottleneck", {},
     3 * 2 * 4096 * B * 32),
    ("LLaMA-7B", "Series, math: bottleneck on up,gate (paper)", "bottleneck", {"target_modules": "up_proj,gate_proj"},
     32 * 2 * 2 * 4096 * B),
    ("LLaMA-7B", "AdapterP / Series, commonsense: down (paper)", "adapterp", {}, 32 * 2 * 4096 * B),
    ("LLaMA-7B", "Parallel on up,down (paper)", "parallel", {"target_modules": "up_proj,down_proj"},
     32 * 2 * B * (4096 + 11008)),
    ("LLaMA-7B", "Parallel, default q,k,v", "parallel", {}, 32 * 3 * B * (4096 + 4096)),
    ("BLOOM-7.1B", "LoRA r=8 on query_key_value", "lora", LORA_R8, 30 * 8 * (4096 + 3 * 4096)),
    ("BLOOM-7.1B", "LoRA r=32 on query_key_value,dense_h_to_4h,dense_4h_to_h (paper)", "lora",
     {**LORA_R32, "target_modules": "query_key_value,dense_h_to_4h,dense_4h_to_h"},
     30 * 32 * ((4096 + 3 * 4096) + 2 * (4096 + 16384))),
    ("BLOOM-7.1B", "AdapterH: bottleneck 256 on both MLP layers", "bottleneck", {}, 30 * 2 * 2 * 4096 * B),
    ("BLOOM-7.1B", "Series: dense_4h_to_h (paper) = AdapterP", "adapterp", {}, 30 * 2 * 4096 * B),
    ("BLOOM-7.1B", "Parallel on dense_h_to_4h,dense_4h_to_h (paper)", "parallel",
     {"target_modules": "dense_h_to_4h,dense_4h_to_h"}, 30 * 2 * B * (4096 + 16384)),
    ("GPT-J-6B", "LoRA r=8 on q,v", "lora", LORA_R8, 28 * 2 * 8 * (4096 + 4096)),
    ("GPT-J-6B", "LoRA r=32 on q,k,v,fc_in,fc_out (paper)", "lora",
     {**LORA_R32, "target_modules": "q_proj,k_proj,v_proj,fc_in,fc_out"},
     28 * 32 * (3 * (4096 + 4096) + 2 * (4096 + 16384))),
    ("GPT-J-6B", "AdapterH: bottleneck 256 on fc_in,fc_out", "bottleneck", {}, 28 * 2 * 2 * 4096 * B),
    ("GPT-J-6B", "Series: fc_out (paper) = AdapterP", "adapterp", {}, 28 * 2 * 4096 * B),
    ("GPT-J-6B", "Parallel on fc_in,fc_out (paper)", "parallel", {"target_modules": "fc_in,fc_out"},
     28 * 2 * B * (4096 + 16384)),
]


def count(model_name: str, adapter_name: str, options: dict) -> tuple[int, int]:
    """(trainable, total) parameters of the adapted model, built on the meta device."""
    shape = dict(MODELS[model_name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    with torch.device("meta"):
        model = adapters.build(AutoModelForCausalLM.from_config(config), adapter_name, options)
    return model.get_nb_trainable_parameters()


@pytest.mark.parametrize("model_name, setting, adapter_name, options, expected", SETTINGS, ids=[s[1] for s in SETTINGS])
def test_count_matches_the_hand_formula(model_name, setting, adapter_name, options, expected):
    trainable, _ = count(model_name, adapter_name, options)
    assert trainable == expected


def test_llama_7b_counts_of_the_seed_readme():
    assert count("LLaMA-7B", "lora", {**LORA_R8, "target_modules": "q_proj,v_proj"})[0] == 4_194_304
    assert count("LLaMA-7B", "bottleneck", {"target_modules": "gate_proj,up_proj,down_proj"})[0] == 201_326_592


def table() -> str:
    rows = ["| model | setting | trainable | % of all |", "|---|---|---:|---:|"]
    for model_name, setting, adapter_name, options, _ in SETTINGS:
        trainable, total = count(model_name, adapter_name, options)
        rows.append(f"| {model_name} | {setting} | {trainable:,} | {100 * trainable / total:.2f}% |")
    return "\n".join(rows)


def test_print_the_table(capsys):
    text = table()
    with capsys.disabled():
        print("\n" + text)
    assert text.count("\n") == len(SETTINGS) + 1


if __name__ == "__main__":
    print(table())
