"""The bundled base model models/tiny-math: it loads offline and is a trained language model."""
import json
import math
import os

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ext.bundled import BASE_MODEL as MODEL_DIR
from peft_ext.bundled import TEST_DATA as TEST_SET
MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def test_records():
    with open(TEST_SET, encoding="utf-8") as f:
        return json.load(f)


def test_the_model_directory_is_small():
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, name)) for name in os.listdir(MODEL_DIR))
    assert size <= MAX_BYTES, f"models/tiny-math holds {size / 2**20:.1f} MB; the limit is 20 MB"


def test_it_is_a_llama_with_a_llama_tokenizer(model, tokenizer):
    assert model.config.model_type == "llama"
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert model.config.vocab_size == len(tokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id)


def test_tokenizer_matches_the_shipped_sentencepiece_model(tokenizer, test_records):
    """tokenizer.json (what transformers loads) and tokenizer.model (sentencepiece) agree, BOS first."""
    processor = spm.SentencePieceProcessor(model_file=os.path.join(MODEL_DIR, "tokenizer.model"))
    prompt = "Below is an instruction.\n\n### Instruction:\n{q}\n\n### Response:\n{a}"
    for record in test_records[:50]:
        text = prompt.format(q=record["instruction"], a=record["output"])
        ids = tokenizer(text)["input_ids"]
        assert ids == [tokenizer.bos_token_id] + processor.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_heldout_problems_are_far_more_likely_than_chance(model, tokenizer, test_records):
    """Loss per token on raw test problems (never in pretraining) is far below uniform guessing."""
    texts = [f"{r['instruction']}\n{r['output']}" for r in test_records[:40]]
    losses = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    mean_loss = sum(losses) / len(losses)
    assert mean_loss < math.log(len(tokenizer)) / 4, f"held-out loss {mean_loss:.2f}"


def test_greedy_continuation_does_arithmetic(model, tokenizer):
    """It has learnt the sums and products its pretraining text is full of."""
    facts = {"12 + 7 =": "19", "30 - 4 =": "26", "6 * 8 =": "48", "56 / 7 =": "8"}
    for prompt, result in facts.items():
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert continuation.strip().startswith(result), f"{prompt!r} -> {continuation!r}"
