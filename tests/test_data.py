"""Data loading, prompt rendering and tokenization: what reaches the model, token by token."""
import json

import pytest
from transformers import AutoTokenizer

from peft_ext.adapters import parse_list
from peft_ext.data import IGNORE_INDEX, encode, load_data, split_validation, tokenize, training_sets
from peft_ext.errors import UsageError
from peft_ext.prompts import TEMPLATES_DIR, Prompter, available_templates

RECORD = {"instruction": "Tom has 3 apples and buys 5 more. How many apples does he have?", "input": "", "output": "The answer is 8."}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def test_every_template_renders_and_splits_responses():
    assert {"alpaca", "alpaca_short", "alpaca_legacy", "llm_adapters", "vicuna", "chatml"} <= set(available_templates())
    for name in available_templates():
        p = Prompter.load(name)
        with_input = p.prompt("Add the numbers.", "2 and 3")
        assert "Add the numbers." in with_input and "2 and 3" in with_input
        assert p.response(p.prompt("Q") + " The answer is 5.") == "The answer is 5."


def test_llm_adapters_template_is_the_papers_prompt_byte_for_byte():
    pad = " " * 16
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
        f"{pad}### Instruction:\n{pad}What is 2+2?\n{pad}\n{pad}### Response:\n{pad}"
    )
    assert Prompter.load("llm_adapters").prompt("What is 2+2?") == expected


def test_prompt_masking_is_exact_token_by_token(tokenizer):
    prompter = Prompter.load("alpaca")
    prompt = prompter.prompt(RECORD["instruction"])
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + RECORD["output"])["input_ids"]
    ex = encode(tokenizer, prompter.record_segments(RECORD), cutoff_len=256, train_on_inputs=False)
    assert ex["input_ids"] == full_ids + [tokenizer.eos_token_id]
    # Masked: exactly the tokens the prompt alone produces (the prompt ends in a newline, so no merge).
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):] + [tokenizer.eos_token_id]
    trained = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
    assert trained == RECORD["output"]


def test_token_merged_across_the_boundary_stays_trainable(tokenizer):
    # The llm_adapters prompt ends in 16 spaces: the last spaces merge with the answer's first word.
    prompter = Prompter.load("llm_adapters")
    segments = prompter.record_segments(RECORD)
    ex = encode(tokenizer, segments, cutoff_len=512, train_on_inputs=False)
    prompt_ids = tokenizer(segments[0][0])["input_ids"]
    n_masked = ex["labels"].count(IGNORE_INDEX)
    assert ex["labels"][:n_masked] == [IGNORE_INDEX] * n_masked
    # The prompt alone ends in a lone space token; in the whole text that space joins " The".
    assert n_masked == len(prompt_ids) - 1
    assert ex["input_ids"][:n_masked] == prompt_ids[:n_masked]
    assert tokenizer.decode([ex["input_ids"][n_masked]]) == " The"
    trained = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
    assert trained.endswith(RECORD["output"]) and trained.strip() == RECORD["output"]


def test_cut_prompt_is_fully_masked_and_dropped(tokenizer):
    prompter = Prompter.load("alpaca")
    n_prompt = len(tokenizer(prompter.prompt(RECORD["instruction"]))["input_ids"])
    cutoff = n_prompt - 5
    ex = encode(tokenizer, prompter.record_segments(RECORD), cutoff_len=cutoff, train_on_inputs=False)
    assert len(ex["input_ids"]) == cutoff and ex["labels"] == [IGNORE_INDEX] * cutoff
    assert tokenizer.eos_token_id not in ex["input_ids"]  # truncated: no EOS
    from datasets import Dataset

    kept = tokenize(Dataset.from_list([RECORD, {**RECORD, "instruction": "2+2?"}]), tokenizer, prompter, cutoff, False)
    assert len(kept) == 1  # the example with nothing to learn is dropped


def test_eos_only_when_it_fits_and_train_on_inputs_keeps_all(tokenizer):
    prompter = Prompter.load("alpaca")
    segments = prompter.record_segments(RECORD)
    n = len(tokenizer("".join(t for t, _ in segments))["input_ids"])
    fits = encode(tokenizer, segments, cutoff_len=n + 1, train_on_inputs=True)
    assert fits["input_ids"][-1] == tokenizer.eos_token_id and len(fits["input_ids"]) == n + 1
    assert fits["labels"] == [IGNORE_INDEX] + fits["input_ids"][1:]  # nothing predicts the first token
    exact = encode(tokenizer, segments, cutoff_len=n, train_on_inputs=True)
    assert len(exact["input_ids"]) == n and exact["input_ids"][-1] != tokenizer.eos_token_id


def test_vicuna_answers_after_a_space_and_its_prompt_is_read_as_at_inference(tokenizer):
    """Vicuna v1.1 writes "ASSISTANT: answer", as this template's chat turns do; the space goes with the answer, so
    that the prompt's tokens are those of the inference prompt, which ends at "ASSISTANT:"."""
    prompter = Prompter.load("vicuna")
    text = "".join(t for t, _ in prompter.record_segments(RECORD))
    assert text == prompter.prompt(RECORD["instruction"]) + " " + RECORD["output"]
    chat = [{"from": "human", "value": RECORD["instruction"]}, {"from": "gpt", "value": RECORD["output"]}]
    assert "".join(t for t, _ in prompter.conversation_segments(chat)) == text + "\n"
    ex = encode(tokenizer, prompter.record_segments(RECORD), 256, train_on_inputs=False)
    prompt_ids = tokenizer(prompter.prompt(RECORD["instruction"]))["input_ids"]
    masked = ex["labels"].count(IGNORE_INDEX)
    assert masked == len(prompt_ids) and ex["input_ids"][:masked] == prompt_ids


def test_conversation_masks_user_turns(tokenizer):
    prompter = Prompter.load("vicuna")
    turns = [
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "It is 4."},
        {"from": "human", "value": "And 3+3?"},
        {"from": "gpt", "value": "It is 6."},
    ]
    ex = encode(tokenizer, prompter.conversation_segments(turns), cutoff_len=512, train_on_inputs=False)
    trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
    text = tokenizer.decode(trained, skip_special_tokens=True)
    assert "It is 4." in text and "It is 6." in text
    assert "What is 2+2?" not in text and "And 3+3?" not in text


def test_a_conversations_system_message_is_wrapped_as_the_template_says():
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    chatml = "".join(text for text, _ in Prompter.load("chatml").conversation_segments(turns))
    assert chatml == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n4<|im_end|>\n")
    vicuna = "".join(text for text, _ in Prompter.load("vicuna").conversation_segments(turns))
    assert vicuna == "Be brief.\n\nUSER: 2+2?\nASSISTANT: 4\n"  # a template without chat_system_message


def test_records_may_mix_the_two_spellings_of_turns(tmp_path, monkeypatch):
    """One table gives every turn both pairs of keys, the other pair None."""
    records = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
               {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    hub(monkeypatch, train=records)
    for data in load_data(str(tmp_path / "mixed.json")), load_data("some/chats"):
        texts = ["".join(t for t, _ in Prompter.load("vicuna").record_segments(r)) for r in data]
        assert texts[0].endswith("USER: hi\nASSISTANT: hello\n") and texts[1].endswith("USER: 2+2?\nASSISTANT: 4\n")


def test_load_data_formats(tmp_path):
    records = [RECORD, {**RECORD, "instruction": "2+2?", "extra": 1}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.json").write_text(json.dumps(records))
    (tmp_path / "d" / "test.json").write_text(json.dumps([{"instruction": "2+2?", "answer": "4"}]))  # evaluate.py's
    (tmp_path / "t.txt").write_text("some raw text " * 50)
    (tmp_path / "c.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    assert load_data(str(tmp_path / "a.json"))["instruction"] == [RECORD["instruction"], "2+2?"]
    assert len(load_data(str(tmp_path / "a.jsonl"))) == 2
    assert len(load_data(str(tmp_path / "d"))) == 2  # its test set, without 'output', is not training data
    assert load_data(str(tmp_path / "t.txt")).column_names == ["text"]
    assert load_data(str(tmp_path / "c.json"))[0]["conversations"][1]["value"] == "hello"
    (tmp_path / "one.jsonl").write_text(json.dumps(RECORD) + "\n")  # also valid JSON: one object, not a list
    assert load_data(str(tmp_path / "one.jsonl"))["instruction"] == [RECORD["instruction"]]
    (tmp_path / "latin1.txt").write_bytes("café au lait ".encode("latin-1") * 50)
    with pytest.raises(UsageError, match="latin1.txt is not UTF-8 text .*; save it as UTF-8"):
        load_data(str(tmp_path / "latin1.txt"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORD) + "\n{oops\n")
    with pytest.raises(UsageError, match="bad.jsonl is neither JSON nor JSON Lines \\(line 2: "):
        load_data(str(tmp_path / "bad.jsonl"))
    (tmp_path / "lines.json").write_text(json.dumps(RECORD) + "\n" + json.dumps(RECORD) + "\n{oops\n")  # JSON Lines
    with pytest.raises(UsageError, match="lines.json is neither JSON nor JSON Lines \\(line 3: "):
        load_data(str(tmp_path / "lines.json"))


def hub(monkeypatch, **splits):
    """`datasets.load_dataset` answering with these splits (lists of records), as the hub would, offline."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name: datasets.DatasetDict(
        {split: datasets.Dataset.from_list(records) for split, records in splits.items()}))


def test_hub_records_with_a_text_column_go_through_the_template(monkeypatch, tokenizer):
    """tatsu-lab/alpaca's records also hold their whole text, already formatted; the template and
    --train_on_inputs decide what is trained on, as for a local file."""
    text = "Below is an instruction... " + RECORD["instruction"] + " ### Response: " + RECORD["output"]
    hub(monkeypatch, train=[{**RECORD, "text": text}] * 4)
    data = load_data("tatsu-lab/alpaca")
    assert sorted(data.column_names) == ["input", "instruction", "output"]
    train, _ = training_sets(data, 0, 1, tokenizer, Prompter.load("alpaca"), 256, False)
    trained = tokenizer.decode([t for t in train[0]["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
    assert len(train) == 4 and trained == RECORD["output"]


def test_hub_raw_text_is_its_text_column(monkeypatch, tokenizer):
    hub(monkeypatch, train=[{"text": "the quick brown fox jumps over the lazy dog. " * 20, "source": "web"}])
    data = load_data("some/corpus")
    assert data.column_names == ["text"]
    assert len(tokenize(data, tokenizer, Prompter.load("alpaca"), 32, False)) > 1


def test_hub_set_without_a_train_split_is_refused_naming_its_splits(monkeypatch):
    hub(monkeypatch, validation=[RECORD], test=[RECORD])
    with pytest.raises(UsageError, match="^dataset 'some/set' has no 'train' split, only 'validation', 'test'; save the "
                                         "split to train on as a JSON file and give its path as --data_path$"):
        load_data("some/set")


def test_a_number_as_input_is_read_as_text_beside_text_inputs(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{**RECORD, "input": 12}, {**RECORD, "input": "x"}, {**RECORD, "input": 0}]))
    data = load_data(str(tmp_path / "a.json"))
    assert data["input"] == ["12", "x", "0"]
    assert "\n12\n" in "".join(t for t, _ in Prompter.load("alpaca").record_segments(data[0]))


def test_files_with_a_byte_order_mark_are_read(tmp_path):
    """Notepad and PowerShell save UTF-8 with a byte-order mark."""
    bom = "\ufeff".encode()
    (tmp_path / "a.json").write_bytes(bom + json.dumps([RECORD]).encode())
    (tmp_path / "a.jsonl").write_bytes(bom + json.dumps(RECORD).encode() + b"\n" + json.dumps(RECORD).encode())
    (tmp_path / "t.txt").write_bytes(bom + b"some text")
    (tmp_path / "template.json").write_bytes(bom + (TEMPLATES_DIR / "alpaca.json").read_bytes())
    assert load_data(str(tmp_path / "a.json"))["instruction"] == [RECORD["instruction"]]
    assert len(load_data(str(tmp_path / "a.jsonl"))) == 2
    assert load_data(str(tmp_path / "t.txt"))["text"] == ["some text"]
    assert Prompter.load(str(tmp_path / "template.json")).prompt("Q") == Prompter.load("alpaca").prompt("Q")


def test_raw_text_is_chunked_to_cutoff(tmp_path, tokenizer):
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    data = load_data(str(tmp_path / "t.txt"))
    blocks = tokenize(data, tokenizer, Prompter.load("alpaca"), cutoff_len=32, train_on_inputs=False)
    lengths = [len(b) for b in blocks["input_ids"]]
    assert all(n == 32 for n in lengths[:-1]) and 1 < lengths[-1] <= 32
    assert blocks[0]["labels"] == [IGNORE_INDEX] + blocks[0]["input_ids"][1:]
    all_ids = [t for b in blocks["input_ids"] for t in b]
    assert all_ids == tokenizer(data[0]["text"])["input_ids"] + [tokenizer.eos_token_id]


def test_raw_text_holds_out_whole_blocks(tmp_path, tokenizer):
    """A .txt file is one record: its validation set is made of its blocks, so the default size works on it."""
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    data = load_data(str(tmp_path / "t.txt"))
    blocks = tokenize(data, tokenizer, Prompter.load("alpaca"), cutoff_len=32, train_on_inputs=False)
    train, val = training_sets(data, 0.25, 1, tokenizer, Prompter.load("alpaca"), 32, False)
    assert len(val) == round(len(blocks) / 4) and len(train) + len(val) == len(blocks) > 4
    assert sorted(map(tuple, list(train["input_ids"]) + list(val["input_ids"]))) == sorted(map(tuple, blocks["input_ids"]))
    with pytest.raises(UsageError, match=f"--val_set_size 120 leaves no training data \\({len(blocks)} blocks of --cutoff_len tokens\\)"):
        training_sets(data, 120, 1, tokenizer, Prompter.load("alpaca"), 32, False)


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_examples_without_a_response_token_are_left_out_with_a_note(train_on_inputs, tokenizer, capsys):
    """...whatever --train_on_inputs; an empty response is kept, since EOS is trained."""
    from datasets import Dataset

    records = [{"instruction": "word " * 200, "output": "long prompt"}, {"instruction": "2+2?", "output": "4"},
               {"instruction": "Say nothing.", "output": ""}]
    kept = tokenize(Dataset.from_list(records), tokenizer, Prompter.load("alpaca"), 128, train_on_inputs)
    assert len(kept) == 2 and [row[-1] for row in kept["labels"]] == [tokenizer.eos_token_id] * 2
    assert capsys.readouterr().out.endswith(
        "note: 1 of 3 examples are left out, with no response token to learn from within --cutoff_len 128: their "
        "prompt fills it (a larger --cutoff_len keeps them)\n")


@pytest.mark.parametrize(("size", "expected"), [(0, 0), (3, 3), (0.25, 5), (0.5, 10)])
def test_val_set_size_count_or_fraction(size, expected):
    from datasets import Dataset

    data = Dataset.from_list([{"instruction": str(i), "output": str(i)} for i in range(20)])
    train, val = split_validation(data, size, seed=1)
    assert (len(val) if val else 0) == expected and len(train) == 20 - expected
    with pytest.raises(UsageError):
        split_validation(data, 20, seed=1)


@pytest.mark.parametrize(
    "value", ["[q_proj,v_proj]", "q_proj,v_proj", '["q_proj", "v_proj"]', ["q_proj", "v_proj"], ("q_proj", "v_proj")]
)
def test_target_modules_spellings(value):
    assert parse_list(value) == ["q_proj", "v_proj"]
