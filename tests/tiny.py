"""Tiny offline models of the real families, saved to disk so that `from_pretrained` is what runs."""
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

FAMILIES = ["llama", "bloom", "gptj", "opt", "gpt2", "gpt_neo", "gpt_neox", "qwen2", "mistral"]

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\nUSER: ASSISTANT:",
    "Tom has 3 apples and buys 5 more. How many apples does he have? The answer is 8.",
    "Anna had 12 pencils and gave away 4. She has 12 - 4 = 8 pencils left. The answer is 8.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) , . ? !",
    "Which answer is correct? (A) 1 (B) 2 (C) 3 (D) 4 (E) 5. The answer is (C). true false solution1",
]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the spot; it adds BOS like LLaMA's and has no pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def config_for(family: str, vocab_size: int):
    """A config of `family` with 2 layers and hidden size 32 (MLP 64)."""
    # A wide init makes the frozen output layer expressive enough for an adapter to lower the loss fast.
    init = {"opt": "init_std"}.get(family, "initializer_range")
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **{init: 0.3})
    small = {
        "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
        "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512),
        "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=512),
        # A local window that holds the tests' longest prompt and answer, so that the shared prefix is used
        "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=320,
                        max_position_embeddings=512),
        "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512),
    }[family]
    return AutoConfig.for_model(family, **common, **small)


def save_tiny_model(family: str, path: str, seed: int = 0) -> str:
    """Write a random tiny `family` model and the tokenizer to `path`; returns the path."""
    os.makedirs(path, exist_ok=True)
    make_tokenizer().save_pretrained(path)
    config_for(family, 512).save_pretrained(path)  # vocab size fixed below
    # Some families load the tokenizer as their own class, which may add tokens (Qwen2 adds a pad).
    vocab_size = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config_for(family, vocab_size)).save_pretrained(path)
    return path


def without_eos(path: str, copy: str) -> str:
    """A copy of the saved model at `path` whose tokenizer and configs name no EOS token (nor UNK or pad); returns it."""
    import json
    import shutil

    shutil.copytree(path, copy)
    for name, keys in [("tokenizer_config.json", ("eos_token", "unk_token")), ("config.json", ("eos_token_id", "pad_token_id")),
                       ("generation_config.json", ("eos_token_id", "pad_token_id"))]:
        with open(os.path.join(copy, name)) as f:
            settings = json.load(f)
        settings.update(dict.fromkeys(keys))  # null: left out, a config class would put its default back
        with open(os.path.join(copy, name), "w") as f:
            json.dump(settings, f)
    return copy
