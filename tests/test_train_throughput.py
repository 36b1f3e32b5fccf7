"""finetune.py's faster batching learns what plain random-order, padded batching learns."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq
from transformers.trainer_pt_utils import BatchRebalanceSampler

from peft_ext import adapters, packing, training
from peft_ext.data import encode
from peft_ext.modeling import load_tokenizer
from peft_ext.prompts import Prompter
from tiny import FAMILIES

TEXTS = [
    "What is 2 + 3? The answer is 5.",
    "Tom has 3 apples and buys 5 more. How many apples does he have? The answer is 8.",
    "Which is correct? (A) 1",
    "Anna had 12 pencils and gave away 4. She has 12 - 4 = 8 pencils left.",
]
OPTIONS = dict(
    target_modules=None, lora_r=4, lora_alpha=8, lora_dropout=0.0, num_virtual_tokens=4, bottleneck_size=8,
    non_linearity="tanh", adapter_dropout=0.0, use_parallel_adapter=False, use_adapterp=False, scaling=1.0,
    init_weights="bert", embedding_lambda=0.0, ffn=None,
)


def examples(tokenizer, texts):
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)} for ids in tokenizer(texts)["input_ids"]]


def adapted(base_dir, method="lora", dropout=True):
    """The tiny model with the adapter; `dropout=False` zeroes the base model's dropout rates (gpt2's, opt's)."""
    config = AutoConfig.from_pretrained(base_dir)
    if not dropout:
        for name, value in config.to_dict().items():
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(config, name, 0.0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, config=config, dtype=torch.float32)
    return adapters.build(base, method, dict(OPTIONS))


def loss_and_grads(model, batches, num_items=None):
    """Summed loss of the batches and the gradients of the trainable tensors."""
    model.zero_grad()
    total = 0
    for batch in batches:
        loss = model(**batch, **({"num_items_in_batch": num_items} if num_items else {})).loss
        loss.backward()
        total += loss.item()
    return total, [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["lora", "prefix-tuning", "prompt-tuning"])
@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_batch_needs_no_padding_mask(family, method, tiny_model_dir):
    base = tiny_model_dir(family)
    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(examples(tokenizer, TEXTS))
    assert (batch["attention_mask"] == 0).any()
    model = adapted(base, method)
    masked = loss_and_grads(model, [batch])
    unmasked = loss_and_grads(model, [{k: v for k, v in batch.items() if k != "attention_mask"}])
    assert unmasked[0] == pytest.approx(masked[0], abs=1e-5)
    for got, want in zip(unmasked[1], masked[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_trainer_loss_without_the_mask_equals_the_masked_loss(llama, tmp_path):
    tokenizer = load_tokenizer(llama)
    model = adapted(llama)
    trainer = training.make_trainer(
        model, tokenizer, None, None, output_dir=str(tmp_path), micro_batch_size=2, accumulation=1, num_epochs=1,
        max_steps=1, learning_rate=1e-3, warmup_steps=0, eval_step=1, save_step=1, save_total_limit=1,
        group_by_length=False, checkpointing=False, seed=0, report=training.Reporting(["none"], None),
    )
    batch = trainer.data_collator(examples(tokenizer, TEXTS))
    assert trainer.compute_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), abs=1e-6)


def test_cutting_a_step_into_rebalanced_micro_batches_keeps_its_gradient(llama):
    """One padded batch of 16 against the sampler's micro batches of the same 16 (the Trainer's loss scaling)."""
    tokenizer = load_tokenizer(llama)
    tokenizer.padding_side = "right"
    features = examples(tokenizer, [TEXTS[i % 4][: 20 + 7 * i] for i in range(16)])
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    model = adapted(llama)
    whole = loss_and_grads(model, [collate(features)])

    sampler = BatchRebalanceSampler([len(f["input_ids"]) for f in features], effective_batch_size=16, dp_size=1, grad_accum=4)
    micro = list(sampler)
    assert sorted(i for m in micro for i in m) == list(range(16)) and len({len(m) for m in micro}) > 1
    batches = [collate([features[i] for i in m]) for m in micro]
    label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    cut = loss_and_grads(model, batches, num_items=label_tokens)
    assert cut[0] == pytest.approx(whole[0], rel=1e-5)
    for got, want in zip(cut[1], whole[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def micro_batches(llama, tmp_path, seed, n=48):
    tokenizer = load_tokenizer(llama)
    from datasets import Dataset

    data = Dataset.from_list(examples(tokenizer, [TEXTS[i % 4][: 10 + i] for i in range(n)]))
    trainer = training.make_trainer(
        adapted(llama), tokenizer, data, None, output_dir=str(tmp_path / str(seed)), micro_batch_size=4,
        accumulation=4, num_epochs=1, max_steps=-1, learning_rate=1e-3, warmup_steps=0, eval_step=1,
        save_step=100, save_total_limit=1, group_by_length=False, checkpointing=False, seed=seed,
        report=training.Reporting(["none"], None),
    )
    return data, list(trainer.get_train_dataloader().batch_sampler)


def test_each_step_is_a_seeded_random_set_of_batch_size_examples_sorted_by_length(llama, tmp_path):
    data, micro = micro_batches(llama, tmp_path, seed=1)
    assert sorted(i for m in micro for i in m) == list(range(len(data)))  # every example once per epoch
    steps = [micro[s : s + 4] for s in range(0, len(micro), 4)]
    assert [sum(len(m) for m in step) for step in steps] == [16, 16, 16]
    for step in steps:  # a step is cut by length: its micro batches hold neighbouring lengths
        spans = sorted((min(lengths), max(lengths)) for lengths in ([len(data[i]["input_ids"]) for i in m] for m in step))
        assert all(longest <= next_shortest for (_, longest), (next_shortest, _) in zip(spans, spans[1:]))
    steps = [sum(step, []) for step in steps]
    # A random set per step, not a run of neighbours, and the run's seed picks it.
    assert any(max(s) - min(s) > 16 for s in steps)
    assert micro_batches(llama, tmp_path, seed=1)[1] == micro
    assert micro_batches(llama, tmp_path, seed=2)[1] != micro


def packing_trainer(base, method, tmp_path, features, dropout=True, **kwargs):
    from datasets import Dataset

    tokenizer = load_tokenizer(base)
    model = adapted(base, method, dropout)
    options = dict(
        output_dir=str(tmp_path), micro_batch_size=2, accumulation=2, num_epochs=1, max_steps=-1, learning_rate=1e-3,
        warmup_steps=0, eval_step=1, save_step=100, save_total_limit=1, group_by_length=False, checkpointing=False,
        seed=0, report=training.Reporting(["none"], None),
    )
    trainer = training.make_trainer(model, tokenizer, Dataset.from_list(features), None, **{**options, **kwargs})
    return model, tokenizer, trainer


PACKED_METHODS = ["lora", "dora", "ia3", "bottleneck"]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", PACKED_METHODS)
@pytest.mark.parametrize("family", sorted(packing.FAMILIES))
def test_a_packed_step_has_the_padded_steps_loss_and_gradients(family, method, checkpointing, tiny_model_dir, tmp_path):
    """One optimizer step's micro batches through the Trainer's training_step, against one padded batch of them."""
    base = tiny_model_dir(family)
    features = examples(load_tokenizer(base), [TEXTS[i % 4][: 15 + 9 * i] for i in range(4)])
    model, tokenizer, trainer = packing_trainer(base, method, tmp_path, features, checkpointing=checkpointing, dropout=False)
    step, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, "cpu")
    assert [b["input_ids"].shape[0] for b in step] == [1, 1]  # each micro batch is one packed row
    assert num_items == sum(len(f["input_ids"]) - 1 for f in features)  # every label token of the step, once

    model.zero_grad()
    packed_loss = sum(trainer.training_step(model, batch, num_items).item() for batch in step)
    packed_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    tokenizer.padding_side = "right"
    padded = loss_and_grads(model, [DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(features)])
    assert packed_loss == pytest.approx(padded[0], rel=1e-5)
    for got, want in zip(packed_grads, padded[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_padded_step_is_divided_by_the_tokens_it_predicts(family, tiny_model_dir, tmp_path):
    """The Trainer divides a step's summed token losses by the labels it counts, leaving out each row's first (which
    nothing predicts) only for the model classes whose loss it knows, not GPT2LMHeadModel (transformers 5.23):
    finetune.py's examples mask their first label, so every family divides by what a packed step divides by."""
    base = tiny_model_dir(family)
    tokenizer, prompter = load_tokenizer(base), Prompter.load("alpaca")
    features = [encode(tokenizer, prompter.record_segments({"instruction": text, "input": "", "output": "It is."}), 256, True)
                for text in TEXTS]
    _, _, trainer = packing_trainer(base, "lora", tmp_path, features, packing=False)
    _, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, "cpu")
    assert num_items == sum(len(f["input_ids"]) - 1 for f in features)


@pytest.mark.parametrize(
    ("family", "method", "packing_flag"),
    [("bloom", "lora", True), ("gptj", "lora", True), ("gpt_neo", "lora", True), ("llama", "prefix-tuning", True),
     ("llama", "p-tuning", True), ("llama", "prompt-tuning", True), ("llama", "lora", False)],
)
def test_other_families_methods_and_packing_off_train_on_padded_batches(family, method, packing_flag, tiny_model_dir, tmp_path):
    base = tiny_model_dir(family)
    features = examples(load_tokenizer(base), TEXTS)
    _, _, trainer = packing_trainer(base, method, tmp_path, features, packing=packing_flag)
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.packed_collator is None and batch["input_ids"].shape[0] == 2 and "cu_seq_lens_q" not in batch


def test_a_model_on_a_gpu_trains_on_padded_batches(tiny_model_dir, tmp_path, monkeypatch):
    """Packing is slower than length-sorted padding on a GPU (benchmarks/README.md), so a model there is not packed."""
    base = tiny_model_dir("llama")
    features = examples(load_tokenizer(base), TEXTS)
    model, _, trainer = packing_trainer(base, "lora", tmp_path, features)
    assert trainer.packed_collator is not None and packing.faster(model)
    with monkeypatch.context() as patch:
        patch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)), raising=False)
        assert not packing.faster(model)
    monkeypatch.setattr(packing, "faster", lambda model: False)
    _, _, on_gpu = packing_trainer(base, "lora", tmp_path, features)
    assert on_gpu.packed_collator is None and "cu_seq_lens_q" not in next(iter(on_gpu.get_train_dataloader()))


def test_examples_longer_than_a_sliding_window_are_not_packed(tiny_model_dir, tmp_path):
    base = tiny_model_dir("mistral")
    features = examples(load_tokenizer(base), TEXTS)
    model, _, trainer = packing_trainer(base, "lora", tmp_path, features)
    assert trainer.packed_collator is not None
    model.get_base_model().config.sliding_window = 8
    assert not packing.supports(model, longest=max(len(f["input_ids"]) for f in features))


def test_packed_training_counts_real_tokens_and_leaves_the_models_attention_as_it_was(llama, tmp_path):
    from datasets import Dataset

    features = examples(load_tokenizer(llama), TEXTS)
    model, _, trainer = packing_trainer(llama, "lora", tmp_path, features)
    config = model.get_base_model().config
    own = config._attn_implementation
    seen = []
    model.get_base_model().register_forward_pre_hook(lambda module, args: seen.append(config._attn_implementation))
    trainer.eval_dataset = Dataset.from_list(features)
    trainer.train()
    assert trainer.state.global_step == 1 and seen == [packing.IMPLEMENTATION] * 2
    assert trainer.state.num_input_tokens_seen == sum(len(f["input_ids"]) for f in features)
    assert config._attn_implementation == own
    evaluation = next(iter(trainer.get_eval_dataloader()))  # evaluation keeps padded batches and the own attention
    assert evaluation["input_ids"].shape[0] == 2 and "cu_seq_lens_q" not in evaluation
    trainer.evaluate()
    assert seen[2:] == [own, own]
