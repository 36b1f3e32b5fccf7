"""evaluate.py end to end on tiny random models and a few real examples of ../shared/data/eval."""
import csv
import errno
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from checkpoints import make_checkpoint
from conftest import ROOT, ctrl_c_reaches_it
from peft_ext import adapters, answers, bundled, evaluation, generation
from peft_ext.checkpoint import load_for_inference, resolve_checkpoint
from peft_ext.errors import UsageError
from peft_ext.prompts import Prompter
from tiny import FAMILIES

spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "evaluate.py"))
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

FAST = dict(max_new_tokens=12, batch_size=4)  # short answers keep a run at a second or two


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """A finetune.py-style LoRA checkpoint (adapter, tokenizer, template, run.json) made without training."""
    return make_checkpoint(tiny_model_dir("llama"), str(tmp_path_factory.mktemp("ckpt") / "llama-lora"))


@pytest.fixture
def data_dir(shared_data):
    return os.path.join(shared_data, "eval")


def run(tmp_path, **flags) -> str:
    """evaluate.main in this process; returns the run's folder."""
    flags = {**FAST, "output_dir": str(tmp_path / "out"), **flags}
    evaluate.main(**flags)
    return flags["output_dir"]


def predictions(folder: str) -> list[dict]:
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def metrics(folder: str) -> dict:
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


def test_end_to_end_svamp_and_boolq(tmp_path, checkpoint, data_dir):
    out = run(tmp_path, lora_weights=checkpoint, dataset="SVAMP,boolq", data_dir=data_dir, max_examples=5)
    for name, kind, budget in [("SVAMP", "number", 12), ("boolq", "label", 12)]:
        folder = os.path.join(out, "llama-llama-lora", name)
        rows, m = predictions(folder), metrics(folder)
        assert [r["index"] for r in rows] == list(range(5))
        assert set(rows[0]) == {"index", "prompt", "response", "prediction", "label", "correct"}
        assert rows[0]["prompt"].startswith("Below is an instruction") and rows[0]["prompt"].endswith("### Response:\n")
        assert m["n"] == 5 and m["kind"] == kind and m["correct"] == sum(r["correct"] for r in rows)
        assert m["settings"]["max_new_tokens"] == budget and m["settings"]["num_beams"] == 1
    with open(os.path.join(out, "results.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("finished_at,model,adapter,dataset,accuracy") and len(lines) == 3
    assert ",llama,llama-lora,SVAMP," in lines[1] and ",llama,llama-lora,boolq," in lines[2]


def test_a_set_finished_by_a_stopped_run_gets_its_results_row_once(tmp_path, checkpoint, data_dir, monkeypatch):
    """Stopped between metrics.json and its results.csv row, the run's next call adds the row, and later calls add
    no second one."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "append_result", stopped)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, **flags)
    out = str(tmp_path / "out")
    assert not os.path.exists(os.path.join(out, "results.csv"))
    finished_at = metrics(os.path.join(out, "llama-llama-lora", "SVAMP"))["finished_at"]
    for _ in range(2):
        run(tmp_path, **flags)
        with open(os.path.join(out, "results.csv"), newline="") as f:
            assert [(row["dataset"], row["finished_at"]) for row in csv.DictReader(f)] == [("SVAMP", finished_at)]


def test_labels_name_folders_inside_the_output_dir(tmp_path, checkpoint, data_dir):
    """A hub id or a `..` as a label stays in the tables but cannot put the run's folder anywhere else."""
    out = run(tmp_path / "deep" / "er", lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=1,
              model="../../meta-llama/Llama-2-7b-hf", adapter="r=8/α=16")
    assert sorted(os.listdir(out)) == ["_._.._meta-llama_Llama-2-7b-hf-r_8_α_16", "results.csv"]
    assert sorted(os.listdir(tmp_path)) == ["deep"] and sorted(os.listdir(tmp_path / "deep")) == ["er"]
    with open(os.path.join(out, "results.csv")) as f:
        row = next(csv.DictReader(f))
    assert (row["model"], row["adapter"]) == ("../../meta-llama/Llama-2-7b-hf", "r=8/α=16")


def test_named_sets_are_found_in_this_projects_data_from_any_folder(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: the default --data_dir is the project's, not the working folder's
    out = run(tmp_path, lora_weights=checkpoint, dataset="synth_math", max_examples=2)
    assert metrics(os.path.join(out, "llama-llama-lora", "synth_math"))["file"] == bundled.TEST_DATA


def test_dataset_defaults_decide_the_budget(tmp_path, checkpoint, data_dir):
    out = run(tmp_path, weights_path=checkpoint, dataset="boolq", data_dir=data_dir, max_examples=1, max_new_tokens=0)
    assert metrics(os.path.join(out, "llama-llama-lora", "boolq"))["settings"]["max_new_tokens"] == 32


def test_batched_equals_one_at_a_time(tmp_path, checkpoint, data_dir):
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=6, max_new_tokens=24)
    one = run(tmp_path / "one", batch_size=1, **flags)
    batched = run(tmp_path / "batched", batch_size=6, **flags)
    folder = os.path.join("llama-llama-lora", "SVAMP")
    responses = [r["response"] for r in predictions(os.path.join(one, folder))]
    assert responses == [r["response"] for r in predictions(os.path.join(batched, folder))]
    assert len(set(responses)) > 1  # the prompts really differ in what they produce


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_batched_equals_one_at_a_time_other_families(tmp_path, tiny_model_dir, data_dir, family):
    """Families with absolute positions (GPT-2) or ALiBi (BLOOM) need the padding handled differently."""
    flags = dict(base_model=tiny_model_dir(family), dataset="AddSub", data_dir=data_dir, max_examples=4, num_beams=2)
    one, batched = run(tmp_path / "one", batch_size=1, **flags), run(tmp_path / "batched", batch_size=4, **flags)
    folder = os.path.join(f"{family}-base", "AddSub")
    assert predictions(os.path.join(one, folder)) == predictions(os.path.join(batched, folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_loop_gives_what_transformers_generate_gives(tiny_model_dir, data_dir, family, monkeypatch):
    """Our greedy loop reads the prompts after the shared prefix's KV cache (padding between the two), in
    chunks of like lengths, into a cache that grows in place, drops each row as it ends and lets the next
    prompts join; the responses must be transformers' greedy ones for each prompt alone, unpadded, with a stop
    string that ends one row early and with none."""
    model, tokenizer = load_for_inference(resolve_checkpoint(tiny_model_dir(family)))
    records = json.load(open(os.path.join(data_dir, "SVAMP", "test.json")))[:5]
    prompts = [Prompter.load("alpaca").prompt(r["instruction"]) for r in records]
    rows = tokenizer(prompts)["input_ids"]
    prefix = generation.SharedPrefix(rows)
    assert len(prefix.ids) > 10 and generation.prefix_fits(model, prefix, rows, 24)
    assert len({len(row) for row in rows}) > 2  # rows padded by different amounts
    monkeypatch.setattr(generation, "PREFILL_ROWS", 2)  # chunks of different lengths, merged into one cache
    monkeypatch.setattr(generation, "CACHE_GROWTH", 5)  # the cache grows several times
    assert generation.runs_greedy_loop(model, generation.decoding_config(model, tokenizer, 24))
    unstopped = generation.generate(model, tokenizer, prompts, generation.decoding_config(model, tokenizer, 24), prefix)
    longest = max(range(len(prompts)), key=lambda i: len(unstopped[i]))
    middle = len(unstopped[longest]) // 2
    stop = unstopped[longest][middle:middle + 3]  # text that row produces: it ends there, others may go on
    configs = [generation.decoding_config(model, tokenizer, 24, stop=s) for s in [(), (stop,)]]
    ours = [generation.generate(model, tokenizer, prompts, config, prefix) for config in configs]
    assert ours[0] == unstopped and len(ours[1][longest]) <= middle
    assert ours == [generation.generate(model, tokenizer, prompts, config) for config in configs]  # no prefix: left padding
    # Two rows at a time: a prompt joins as soon as a row ends, and padding is cut out as soon as all rows have it.
    monkeypatch.setattr(generation, "COMPACT_AT", 1)
    joins, shifts = [], []
    admit, shift_left = generation.LiveBatch.admit, generation.LiveBatch.shift_left
    monkeypatch.setattr(generation.LiveBatch, "admit", lambda self, *a: joins.append(len(self.index)) or admit(self, *a))
    monkeypatch.setattr(generation.LiveBatch, "shift_left", lambda self, n: shifts.append(n) or shift_left(self, n))
    for config, expected in zip(configs, ours):
        streamed = dict(pair for finished in generation.stream(model, tokenizer, rows, config, 2, prefix) for pair in finished)
        assert [streamed[i] for i in range(len(prompts))] == expected
    assert any(joins) and shifts  # rows joined a running batch, and the cache was shifted
    monkeypatch.setattr(generation, "runs_greedy_loop", lambda model, config: False)
    assert ours == [[generation.generate(model, tokenizer, [prompt], config)[0] for prompt in prompts] for config in configs]


def test_shared_prefix_is_the_common_token_prefix(tiny_model_dir):
    """Tokens, not text: prompts that share "Tom has 3 app" but tokenize it differently share only what their
    tokens share; a prompt that is all prefix keeps its last token; and a window the padding could shift
    (GPT-Neo's local attention), by up to COMPACT_AT columns more than a row's own length, turns the prefix off."""
    _, tokenizer = load_for_inference(resolve_checkpoint(tiny_model_dir("llama")))
    prompts = ["Tom has 3 apples and", "Tom has 3 apply", "Tom has 3 apples and 5"]
    rows = tokenizer(prompts)["input_ids"]
    prefix = generation.SharedPrefix(rows)
    common = next(i for i, column in enumerate(zip(*rows)) if len(set(column)) > 1)
    assert prefix.ids == rows[0][:common] and tokenizer.decode(prefix.ids) != "<s>Tom has 3 app"
    assert generation.SharedPrefix(rows[::2]).ids == rows[0][:-1]
    windowed = SimpleNamespace(config=SimpleNamespace(window_size=len(rows[2]) + 23 + generation.COMPACT_AT))
    assert generation.prefix_fits(windowed, prefix, rows, 23) and not generation.prefix_fits(windowed, prefix, rows, 24)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_a_row_left_alone_after_a_long_one_decodes_as_if_alone(tiny_model_dir, family):
    """When the long prompt's row leaves, the short one's padding (wider than its own tokens) is cut out of the
    cache; its next tokens must still be transformers' greedy ones for it alone."""
    model, tokenizer = load_for_inference(resolve_checkpoint(tiny_model_dir(family)))
    long, short = tokenizer(["Tom has 3 apples and buys 5 more apples at the shop. " * 4, "Tom has"])["input_ids"]
    assert len(long) - len(short) > generation.COMPACT_AT
    alone = model.generate(torch.tensor([short]), generation_config=generation.decoding_config(model, tokenizer, 8))
    batch = generation.LiveBatch(model, 2, [], {}, positional=family != "bloom")
    with torch.inference_mode():
        batch.admit([long, short], [0, 1])
        tokens = [batch.next_ids[1].item()]
        batch.step()
        tokens.append(batch.next_ids[1].item())
        batch.drop(torch.tensor([True, False]))  # the long row ends: the short one is all that is left
        assert batch.end == len(short) + 1 and batch.index == [1]  # its padding is gone
        for _ in range(6):
            batch.step()
            tokens.append(batch.next_ids[0].item())
    assert tokens == alone[0, len(short):].tolist()


def test_finished_rows_leave_by_the_fewest_moves():
    finished = torch.tensor([False, True, False, True, False, False])
    assert generation.survivors(finished).tolist() == [0, 4, 2, 5]  # rows 0 and 2 stay; 4 and 5 take 1's and 3's places


def test_greedy_ignores_the_checkpoints_generation_defaults():
    """A model's generation_config may sample or penalize repeats; greedy evaluation keeps only its token ids."""
    saved = GenerationConfig(do_sample=True, temperature=0.6, repetition_penalty=1.3, no_repeat_ngram_size=3,
                             bos_token_id=1, eos_token_id=[2, 7])
    model, tokenizer = SimpleNamespace(generation_config=saved), SimpleNamespace(pad_token_id=0, eos_token_id=2)
    config = generation.decoding_config(model, tokenizer, 32, stop=("###",))
    assert not config.do_sample and config.repetition_penalty in (None, 1.0) and not config.no_repeat_ngram_size
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id, config.stop_strings) == ([2, 7], 1, 0, ["###"])


# Prompt tuning and p-tuning put virtual tokens before the padding: the case that needs equal-length batches.
FAST_METHODS = {"lora", "prompt-tuning", "prefix-tuning"}


@pytest.mark.parametrize("method", [m if m in FAST_METHODS else pytest.param(m, marks=pytest.mark.slow) for m in adapters.METHODS])
def test_every_method_batched_equals_one_at_a_time(tmp_path, tiny_model_dir, data_dir, method):
    ckpt = make_checkpoint(tiny_model_dir("llama"), str(tmp_path / "ckpt"), method)
    flags = dict(lora_weights=ckpt, dataset="SVAMP", data_dir=data_dir, max_examples=5)
    one, batched = run(tmp_path / "one", batch_size=1, **flags), run(tmp_path / "batched", batch_size=5, **flags)
    folder = os.path.join("llama-ckpt", "SVAMP")
    assert predictions(os.path.join(one, folder)) == predictions(os.path.join(batched, folder))


def test_a_prompt_tuning_run_prints_no_warnings(tmp_path, tiny_model_dir, data_dir):
    """A real command line (warning filters as users get them, not as pytest resets them): peft's generate for
    prompt tuning warns that it drops transformers' position ids, which is harmless for unpadded batches and
    must not reach the user; stderr holds the progress bars and nothing that looks like a warning."""
    ckpt = make_checkpoint(tiny_model_dir("llama"), str(tmp_path / "ckpt"), "prompt-tuning")
    command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--lora_weights", ckpt, "--dataset", "SVAMP",
               "--data_dir", data_dir, "--output_dir", str(tmp_path / "out"), "--max_examples", "3", "--max_new_tokens", "4"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SVAMP" in done.stderr and "warn" not in done.stderr.lower(), done.stderr[-2000:]


def test_base_model_alone_and_merged_model(tmp_path, checkpoint, tiny_model_dir, data_dir):
    base = tiny_model_dir("llama")
    out = run(tmp_path, base_model=base, dataset="AddSub", data_dir=data_dir, max_examples=3)
    assert metrics(os.path.join(out, "llama-base", "AddSub"))["settings"]["lora_weights"] is None

    from peft import PeftModel

    merged_dir = str(tmp_path / "merged")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), checkpoint).merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(merged_dir)
    merged = run(tmp_path, base_model=merged_dir, dataset="AddSub", data_dir=data_dir, max_examples=3)
    adapter = run(tmp_path, lora_weights=checkpoint, dataset="AddSub", data_dir=data_dir, max_examples=3)
    responses = lambda out, label: [r["response"] for r in predictions(os.path.join(out, label, "AddSub"))]  # noqa: E731
    assert responses(merged, "merged-base") == responses(adapter, "llama-llama-lora")


def test_a_checkpoint_n_folder_takes_the_runs_template(tmp_path, checkpoint):
    """checkpoint-N/ folders saved during training hold the adapter and tokenizer but no template or run.json:
    those of the run's folder above apply, not the default template."""
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir)
    Prompter.load("alpaca_short").save(str(run_dir))
    step = run_dir / "checkpoint-7"
    step.mkdir()
    for name in os.listdir(checkpoint):
        if name.startswith(("adapter_", "tokenizer")):
            shutil.copy(os.path.join(checkpoint, name), step / name)
    resolved = resolve_checkpoint(adapter_dir=str(step))
    assert resolved.prompter.template["prompt_no_input"] == Prompter.load("alpaca_short").template["prompt_no_input"]
    assert resolved.prompter.template["prompt_no_input"] != Prompter.load("alpaca").template["prompt_no_input"]
    assert resolved.run_args["adapter_name"] == "lora" and resolved.adapter_dir == str(step)


def test_a_relative_base_model_resolves_from_another_directory(tmp_path, checkpoint, tiny_model_dir, data_dir, monkeypatch):
    """finetune.py ran in `work` with --base_model models/base; evaluate.py runs elsewhere."""
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "work" / "models" / "base")
    adapter = shutil.copytree(checkpoint, tmp_path / "adapter")
    record = {"args": {"base_model": "models/base"}, "base_model_dir": str(tmp_path / "work" / "models" / "base")}
    (adapter / "run.json").write_text(json.dumps(record))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resolve_checkpoint(adapter_dir=str(adapter)).base_model == record["base_model_dir"]
    relative = run(tmp_path, lora_weights=str(adapter), dataset="AddSub", data_dir=data_dir, max_examples=3)
    monkeypatch.chdir(tmp_path / "work")  # where the given path resolves, it wins
    assert resolve_checkpoint(adapter_dir=str(adapter)).base_model == "models/base"
    straight = run(tmp_path / "work", lora_weights=checkpoint, dataset="AddSub", data_dir=data_dir, max_examples=3)
    responses = lambda out, label: [r["response"] for r in predictions(os.path.join(out, label, "AddSub"))]  # noqa: E731
    assert responses(relative, "base-adapter") == responses(straight, "llama-llama-lora")


def test_8bit_model_logs_its_input_cast_once(tmp_path, checkpoint, data_dir, caplog):
    """bitsandbytes' 8-bit matmul logs its float16 cast at every call of every layer; peft_ext lets it through once."""
    caplog.set_level(logging.WARNING, logger="bitsandbytes")
    out = run(tmp_path, lora_weights=checkpoint, dataset="AddSub", data_dir=data_dir, max_examples=4, load_8bit=True)
    assert len(predictions(os.path.join(out, "llama-llama-lora", "AddSub"))) == 4
    assert sum("MatMul8bitLt" in r.getMessage() for r in caplog.records) <= 1


def test_resume_after_interruption_redoes_nothing(tmp_path, checkpoint, data_dir, monkeypatch):
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=8, batch_size=2)
    reference = run(tmp_path / "uninterrupted", **flags)

    real_stream, made = evaluation.stream, []

    def stream_then_crash(model, tokenizer, rows, config, batch_size, prefix):
        for finished in real_stream(model, tokenizer, rows, config, batch_size, prefix):
            for i, response in finished:
                yield [(i, response)]
                made.append(tuple(rows[i]))
                if len(made) == 4:
                    raise KeyboardInterrupt  # the other four are never finished

    monkeypatch.setattr("peft_ext.evaluation.stream", stream_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "interrupted", **flags)
    folder = os.path.join(tmp_path / "interrupted" / "out", "llama-llama-lora", "SVAMP")
    assert len(predictions(folder)) == 4 and not os.path.exists(os.path.join(folder, "metrics.json"))
    with open(os.path.join(folder, "predictions.jsonl"), "a") as f:
        f.write('{"index": 7, "prompt": "Below is')  # a line cut short by the crash

    seen = []
    monkeypatch.setattr("peft_ext.evaluation.stream", lambda m, t, p, c, b, x: seen.extend(map(tuple, p)) or real_stream(m, t, p, c, b, x))
    run(tmp_path / "interrupted", **flags)
    assert len(seen) == 4 and not set(made) & set(seen)  # only the four missing examples were generated
    resumed = predictions(folder)
    assert [r["index"] for r in resumed] == list(range(8))
    assert resumed == predictions(os.path.join(reference, "llama-llama-lora", "SVAMP"))
    m, ref = metrics(folder), metrics(os.path.join(reference, "llama-llama-lora", "SVAMP"))
    assert (m["resumed"], m["generated"]) == (4, 4)
    assert (m["accuracy"], m["correct"], m["n"]) == (ref["accuracy"], ref["correct"], ref["n"])


def test_out_of_memory_halves_the_batch_and_loses_nothing(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=8)
    reference = run(tmp_path / "fits", batch_size=2, **flags)
    real_load, calls = evaluate.load_for_inference, []

    def load_into_small_memory(*args, **kwargs):
        """A model that runs out of memory at any call of more than two rows after its 14th call, by which the
        first four prompts are finished (the shared header, the prompts, 11 steps: 12 new tokens at the most)."""
        model, tokenizer = real_load(*args, **kwargs)

        def check_memory(module, args, kwargs):
            calls.append(len(kwargs["input_ids"]))
            if calls[-1] > 2 and len(calls) > 14:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        model.get_base_model().register_forward_pre_hook(check_memory, with_kwargs=True)
        return model, tokenizer

    real_stream, asked = evaluation.stream, []
    monkeypatch.setattr("peft_ext.evaluation.stream", lambda m, t, p, c, b, x: asked.append((len(p), b)) or real_stream(m, t, p, c, b, x))
    monkeypatch.setattr(evaluate, "load_for_inference", load_into_small_memory)
    out = run(tmp_path / "small", batch_size=4, **flags)
    assert "SVAMP: out of GPU memory; going on at --batch_size 2" in capsys.readouterr().err
    assert asked[0] == (8, 4) and asked[1][1] == 2 and 0 < asked[1][0] <= 4  # only the unfinished ones again
    assert predictions(os.path.join(out, "llama-llama-lora", "SVAMP")) == predictions(os.path.join(reference, "llama-llama-lora", "SVAMP"))


def test_out_of_memory_at_batch_size_one_is_one_clear_line(tmp_path, checkpoint, data_dir, monkeypatch):
    tried = []

    def no_memory(model, tokenizer, prompts, config, batch_size, prefix):
        tried.append(batch_size)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        yield

    monkeypatch.setattr("peft_ext.evaluation.stream", no_memory)
    with pytest.raises(UsageError, match="^out of GPU memory at batch size 1: load the model with --load_4bit"):
        run(tmp_path, lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=8, batch_size=5)
    assert tried == [5, 2, 1]


def test_finished_run_loads_no_model(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    run(tmp_path, **flags)
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    run(tmp_path, **flags)
    assert "SVAMP: " in capsys.readouterr().out


def test_first_examples_of_a_larger_run_are_scored_without_the_model(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    """`--max_examples 3` after a run of 6: the score of the first 3 from the saved predictions, at once, in
    metrics.json (which the sweep's tables read); the 6 predictions stay, so 6 again needs no model either."""
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir)
    out = run(tmp_path, max_examples=6, **flags)
    folder = os.path.join(out, "llama-llama-lora", "SVAMP")
    saved, six = open(os.path.join(folder, "predictions.jsonl")).read(), metrics(folder)
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    run(tmp_path, max_examples=3, **flags)
    correct = sum(r["correct"] for r in predictions(folder)[:3])
    assert f"SVAMP: {100 * correct / 3:.1f}% ({correct}/3) (the first 3 of 6 saved predictions) -> {folder}/metrics.json" \
        in capsys.readouterr().out
    assert (metrics(folder)["n"], metrics(folder)["correct"]) == (3, correct)
    assert open(os.path.join(folder, "predictions.jsonl")).read() == saved
    run(tmp_path, max_examples=6, **flags)
    assert {k: v for k, v in metrics(folder).items() if k != "finished_at"} == \
        {**{k: v for k, v in six.items() if k != "finished_at"}, "seconds": 0.0, "examples_per_s": None,
         "generated": 0, "resumed": 6}


def test_suite_table_with_a_missing_set(tmp_path, checkpoint, data_dir, capsys):
    out = run(tmp_path, lora_weights=checkpoint, dataset="commonsense", data_dir=data_dir, max_examples=1,
              max_new_tokens=4, skip_missing=True, model="LLaMA-7B", adapter="LoRA")
    table = open(os.path.join(out, "LLaMA-7B-LoRA", "commonsense.md")).read()
    header, _, row = table.splitlines()
    assert header == "| Model | Adapter | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg (7 of 8) |"
    assert row.startswith("| LLaMA-7B | LoRA |") and row.split(" | ")[5] == "–"
    printed = capsys.readouterr().out
    assert table in printed and "hellaswag: skipped" in printed


def test_aqua_records_both_rules(tmp_path, checkpoint, data_dir):
    out = run(tmp_path, lora_weights=checkpoint, dataset="aqua", data_dir=data_dir, max_examples=2, answer_rule="paper")
    m = metrics(os.path.join(out, "llama-llama-lora", "AQuA"))
    assert m["settings"]["answer_rule"] == "paper" and set(m["accuracy_by_rule"]) == {"strict", "paper"}
    assert m["accuracy"] == m["accuracy_by_rule"]["paper"]


def test_dataset_by_path_and_unknown_set_inferred(tmp_path, checkpoint, data_dir):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "answer": "4"}]))
    out = run(tmp_path, lora_weights=checkpoint, dataset=f"{data_dir}/gsm8k/test.json,{custom}", max_examples=1)
    assert metrics(os.path.join(out, "llama-llama-lora", "gsm8k"))["kind"] == "number"
    assert metrics(os.path.join(out, "llama-llama-lora", "mine"))["kind"] == "number"
    lines = tmp_path / "lines.jsonl"  # JSON Lines, as finetune.py reads them too
    lines.write_text("".join(json.dumps({"instruction": f"What is {n} + 2?", "input": "", "answer": str(n + 2)}) + "\n"
                             for n in range(3)))
    out = run(tmp_path, lora_weights=checkpoint, dataset=str(lines))
    assert metrics(os.path.join(out, "llama-llama-lora", "lines"))["n"] == 3


def cli(monkeypatch, capsys, *args) -> str:
    """Run evaluate.py's command line in this process; returns stderr after checking the exit status."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    capsys.readouterr()  # what earlier runs printed
    with pytest.raises(SystemExit) as exit_info:
        evaluate.run_cli(evaluate.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_input_gives_one_line(tmp_path, checkpoint, tiny_model_dir, data_dir, monkeypatch, capsys):
    out = ["--output_dir", str(tmp_path / "out"), "--data_dir", data_dir]
    assert "does not exist" in cli(monkeypatch, capsys, "--lora_weights", str(tmp_path / "nope"), "--dataset", "SVAMP", *out)
    (tmp_path / "empty").mkdir()
    assert "not an adapter checkpoint" in cli(monkeypatch, capsys, "--lora_weights", str(tmp_path / "empty"), "--dataset", "SVAMP", *out)
    assert "pass it as --base_model" in cli(monkeypatch, capsys, "--lora_weights", tiny_model_dir("llama"), "--dataset", "SVAMP", *out)
    err = cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "svamp2", *out)
    assert "unknown dataset 'svamp2'" in err and "AddSub" in err and "commonsense" in err
    err = cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "SVAMP", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"))
    assert "has no SVAMP/test.json" in err and "data/README.md" in err
    err = cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "hellaswag", *out)
    assert "has no hellaswag/test.json" in err
    no_answer = tmp_path / "no_answer.json"
    no_answer.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "output": "4"}]))
    assert "record 0 has no 'answer'" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", str(no_answer), *out)
    bad_number = tmp_path / "SVAMP" / "test.json"
    bad_number.parent.mkdir()
    bad_number.write_text(json.dumps([{"instruction": "How many?", "input": "", "answer": "many"}]))
    assert "is not a number" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", str(bad_number), *out)
    empty_answer = tmp_path / "empty_answer.json"  # an empty label would match every response
    empty_answer.write_text(json.dumps([{"instruction": "Pick", "answer": ""}, {"instruction": "Pick", "answer": "yes"}]))
    assert "record 0: its answer is empty" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", str(empty_answer), *out)
    list_input = tmp_path / "list_input.json"
    list_input.write_text(json.dumps([{"instruction": "Sum these", "input": [1, 2], "answer": "3"}]))
    assert "has an 'input' that is a list, not text" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", str(list_input), *out)
    assert "--dataset is required" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, *out)
    assert "give one" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--weights_path", str(tmp_path), "--dataset", "SVAMP", *out)
    assert "answer_rule" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "AQuA", "--answer_rule", "first", *out)
    (tmp_path / "a_file").write_text("")
    assert "is a file" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "SVAMP", "--data_dir", data_dir, "--output_dir", str(tmp_path / "a_file"))
    assert "--max_examples at least 0" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "SVAMP", "--max_examples", "-3", *out)
    assert "--dtype 'float64' is not one of auto, float32" in cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "SVAMP", "--dtype", "float64", *out)


def test_two_sets_of_one_name_are_refused(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    """A file named gsm8k.json beside the real GSM8K would share its folder, and be scored with its predictions;
    one file named twice (by name and by a relative path) is one set."""
    mine = tmp_path / "mine" / "gsm8k.json"
    mine.parent.mkdir()
    mine.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "answer": "4"}]))
    err = cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", f"gsm8k,{mine}", "--data_dir", data_dir,
              "--output_dir", str(tmp_path / "out"))
    assert f"/gsm8k/test.json and {mine} would both be scored as 'gsm8k'" in err
    tasks, _ = evaluation.resolve_tasks(f"AddSub,{os.path.relpath(os.path.join(data_dir, 'AddSub', 'test.json'))}", data_dir)
    assert [task.benchmark.name for task in tasks] == ["AddSub"]


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(read_only) and real_access(path, mode))
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    err = cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "SVAMP", "--data_dir", data_dir,
              "--output_dir", str(read_only / "out"))
    assert err == f"error: --output_dir '{read_only}/out' cannot be written ({read_only} is read-only or not yours); choose another --output_dir"
    assert not (read_only / "out").exists()


def test_a_full_disk_mid_run_is_one_line_and_keeps_what_was_saved(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    flags = ["--lora_weights", checkpoint, "--dataset", "SVAMP", "--data_dir", data_dir, "--max_examples", "3",
             "--max_new_tokens", "12", "--batch_size", "1", "--output_dir", str(tmp_path / "out")]
    real_write = evaluation.json.dumps
    written = []

    def dumps_until_full(obj, **kwargs):  # the disk fills up at the third prediction
        if isinstance(obj, dict) and "response" in obj:
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", "predictions.jsonl")
            written.append(obj)
        return real_write(obj, **kwargs)

    monkeypatch.setattr(evaluation.json, "dumps", dumps_until_full)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.run_cli(evaluate.main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: No space left on device (predictions.jsonl); free some space, or choose another output folder, "
        "and run the command again")
    monkeypatch.setattr(evaluation.json, "dumps", real_write)
    folder = os.path.join(tmp_path, "out", "llama-llama-lora", "SVAMP")
    assert len(predictions(folder)) == 2  # the two finished predictions, whole
    evaluate.run_cli(evaluate.main)  # the same command again
    assert metrics(folder)["resumed"] == 2 and [r["index"] for r in predictions(folder)] == [0, 1, 2]


def test_the_checkpoints_template_named_again_is_the_same_setting(tmp_path, checkpoint, data_dir, monkeypatch):
    """The checkpoint's prompt_template.json adds its name to the template's file: the same prompts all the same."""
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    run(tmp_path, **flags)
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    run(tmp_path, prompt_template_name="alpaca", **flags)


def test_another_adapter_of_the_same_folder_name_is_told_apart(tmp_path, checkpoint, tiny_model_dir, data_dir, monkeypatch, capsys):
    """Two runs' `lora/` folders (or `checkpoint-200/` folders) would share one label: the second is asked for its
    own with --adapter, not told to --overwrite the first's; the same adapter moved elsewhere resumes."""
    flags = ["--dataset", "SVAMP", "--data_dir", data_dir, "--max_examples", "2", "--output_dir", str(tmp_path / "out"),
             "--max_new_tokens", "12", "--batch_size", "4"]
    run(tmp_path, lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    other = make_checkpoint(tiny_model_dir("llama"), str(tmp_path / "other" / "llama-lora"), seed=1)
    err = cli(monkeypatch, capsys, "--lora_weights", other, *flags)
    assert (f"holds the predictions of the base model {os.path.realpath(tiny_model_dir('llama'))} with the adapter "
            f"{os.path.realpath(checkpoint)}: give this run a folder of its own with --adapter LABEL") in err
    moved = shutil.copytree(checkpoint, tmp_path / "moved" / "llama-lora")
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    run(tmp_path, lora_weights=str(moved), dataset="SVAMP", data_dir=data_dir, max_examples=2)
    step = shutil.copytree(checkpoint, tmp_path / "run" / "checkpoint-200")
    assert resolve_checkpoint("", str(step)).adapter_label == "run-checkpoint-200"


def test_another_answer_rule_rescores_the_saved_responses(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    flags = dict(lora_weights=checkpoint, dataset="AQuA", data_dir=data_dir, max_examples=4)
    out = run(tmp_path, **flags)
    folder = os.path.join(out, "llama-llama-lora", "AQuA")
    strict = metrics(folder)
    # responses whose letter the two rules read apart: strict takes the stated C, paper the E of "Each"
    saved = [{**r, "response": f"Each option checked, the answer is C because {r['index']} < 5."} for r in predictions(folder)]
    with open(os.path.join(folder, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in saved)
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    run(tmp_path, answer_rule="paper", **flags)
    assert "AQuA: " in capsys.readouterr().out
    paper = metrics(folder)
    assert paper["settings"]["answer_rule"] == "paper" and strict["settings"]["answer_rule"] == "strict"
    assert [r["prediction"] for r in predictions(folder)] == ["E"] * 4
    assert paper["correct"] == sum(r["label"] == "E" for r in saved)
    assert paper["accuracy"] == paper["accuracy_by_rule"]["paper"]
    run(tmp_path, **flags)  # and back: "C" from "The answer is C because"
    assert [r["prediction"] for r in predictions(folder)] == ["C"] * 4
    assert metrics(folder)["correct"] == sum(r["label"] == "C" for r in saved)
    with open(os.path.join(out, "results.csv"), newline="") as f:
        assert [row["answer_rule"] for row in csv.DictReader(f)] == ["strict", "paper", "strict"]


def test_other_settings_are_not_mixed_in(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    out = run(tmp_path, **flags)
    args = ["--lora_weights", checkpoint, "--dataset", "SVAMP", "--data_dir", data_dir, "--max_examples", "2",
            "--output_dir", out, "--max_new_tokens", "12", "--num_beams", "2"]
    err = cli(monkeypatch, capsys, *args)
    assert "num_beams differ" in err and "--overwrite" in err
    run(tmp_path, num_beams=2, overwrite=True, **flags)
    assert metrics(os.path.join(out, "llama-llama-lora", "SVAMP"))["settings"]["num_beams"] == 2
    # A run that stopped before its first prediction left only settings.json: other settings simply start over.
    folder = os.path.join(out, "llama-llama-lora", "SVAMP")
    for name in ("predictions.jsonl", "metrics.json"):
        os.remove(os.path.join(folder, name))
    run(tmp_path, num_beams=1, **flags)
    assert metrics(folder)["settings"]["num_beams"] == 1 and len(predictions(folder)) == 2


def test_predictions_of_earlier_weights_in_the_same_folders_are_not_taken(tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys):
    """Retraining into the adapter's folder (finetune.py --overwrite) or re-exporting a merged model into the base
    model's folder changes the weights under the same paths: the earlier predictions are not this model's."""
    from safetensors.torch import load_file, save_file

    base = str(tmp_path / "base")
    shutil.copytree(tiny_model_dir("llama"), base)
    adapter = make_checkpoint(base, str(tmp_path / "adapter"))
    out = str(tmp_path / "out")
    args = ["--lora_weights", adapter, "--dataset", "SVAMP", "--data_dir", data_dir, "--max_examples", "2",
            "--output_dir", out, "--max_new_tokens", "12", "--batch_size", "4"]
    run(tmp_path, lora_weights=adapter, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    weights = os.path.join(adapter, "adapter_model.safetensors")
    trained = open(weights, "rb").read()
    save_file({name: 2 * t for name, t in load_file(weights).items()}, weights)  # "retrained"
    assert "(lora_weights_sha256 differ; the model's weight files changed since)" in cli(monkeypatch, capsys, *args)
    with open(weights, "wb") as f:  # the same bytes written again: the same adapter
        f.write(trained)
    weights = next(os.path.join(base, f) for f in os.listdir(base) if f.endswith(".safetensors"))
    save_file(load_file(weights), weights)  # "re-exported"
    assert "(base_model_files differ; the model's weight files changed since)" in cli(monkeypatch, capsys, *args)


def test_dtype_is_chosen_recorded_and_not_mixed_in(tmp_path, checkpoint, data_dir, monkeypatch, capsys):
    real_load, loaded = evaluate.load_for_inference, []

    def load_noting_the_dtype(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        loaded.append(model.dtype)
        return model, tokenizer

    monkeypatch.setattr(evaluate, "load_for_inference", load_noting_the_dtype)
    flags = dict(lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    out = run(tmp_path, dtype="bf16", **flags)
    assert loaded == [torch.bfloat16]
    assert metrics(os.path.join(out, "llama-llama-lora", "SVAMP"))["settings"]["dtype"] == "bfloat16"
    with open(os.path.join(out, "results.csv"), newline="") as f:
        assert [row["dtype"] for row in csv.DictReader(f)] == ["bfloat16"]
    err = cli(monkeypatch, capsys, "--lora_weights", checkpoint, "--dataset", "SVAMP", "--data_dir", data_dir, "--max_examples", "2",
              "--output_dir", out, "--max_new_tokens", "12", "--batch_size", "4", "--dtype", "float32")
    assert "dtype differ" in err and "--overwrite" in err


def append_a_row(output_dir: str, label: str, start) -> None:
    start.wait()
    result = {"accuracy": 0.5, "settings": {"num_beams": 1}}
    evaluation.append_result(output_dir, result, model=label, adapter="a", prompt_template="alpaca")


def test_runs_finishing_at_once_write_one_header(tmp_path):
    """Without the lock, two of four runs released at once into a new folder sometimes both wrote the header."""
    context = multiprocessing.get_context("fork")
    for trial in range(20):
        output_dir = tmp_path / str(trial)
        output_dir.mkdir()
        start = context.Barrier(4)
        runs = [context.Process(target=append_a_row, args=(str(output_dir), f"m{i}", start)) for i in range(4)]
        for process in runs:
            process.start()
        for process in runs:
            process.join()
        with open(output_dir / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted(row["model"] for row in rows) == ["m0", "m1", "m2", "m3"]


def test_results_csv_of_an_earlier_version_gains_the_new_columns(tmp_path, checkpoint, data_dir):
    old_fields = [f for f in evaluation.RESULT_FIELDS if f not in ("dtype", "load_8bit", "load_4bit")] + ["note"]
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({**dict.fromkeys(old_fields, ""), "model": "old", "dataset": "AddSub", "accuracy": "12.5", "note": "kept"})
    out = run(tmp_path, lora_weights=checkpoint, dataset="SVAMP", data_dir=data_dir, max_examples=2)
    with open(os.path.join(out, "results.csv"), newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == old_fields + ["dtype", "load_8bit", "load_4bit"]
    assert (rows[0]["model"], rows[0]["accuracy"], rows[0]["note"], rows[0]["dtype"]) == ("old", "12.5", "kept", "")
    assert (rows[1]["model"], rows[1]["dataset"], rows[1]["dtype"], rows[1]["load_4bit"]) == ("llama", "SVAMP", "float32", "False")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
def test_killed_process_resumes(tmp_path, checkpoint, data_dir, stop):
    """A real kill -9 or Ctrl-C mid-run, then the same command again (a larger batch is allowed): every example
    once. Ctrl-C ends with one line saying so and how to go on, and the shell's status 130."""
    out = str(tmp_path / "out")
    command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--lora_weights", checkpoint, "--dataset", "SVAMP",
               "--data_dir", data_dir, "--output_dir", out, "--max_examples", "16", "--max_new_tokens", "32"]
    log = os.path.join(out, "llama-llama-lora", "SVAMP", "predictions.jsonl")
    process = subprocess.Popen(command + ["--batch_size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, preexec_fn=ctrl_c_reaches_it)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if os.path.isfile(log) and len(open(log).readlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(stop)
    stderr = process.communicate(timeout=120)[1]
    if stop == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
        assert stderr.splitlines()[-1].startswith("interrupted: every finished prediction is saved; run the same command")
    first = len(evaluation.read_predictions(log))  # the kill may have cut a last line short
    assert 3 <= first < 16, "the process was not stopped mid-run"
    finished = subprocess.run(command + ["--batch_size", "8"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = predictions(os.path.dirname(log))
    assert sorted(r["index"] for r in rows) == list(range(16))
    assert metrics(os.path.dirname(log))["resumed"] >= first


def free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold torchrun's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_shards_and_merges(tmp_path, checkpoint, data_dir):
    out = str(tmp_path / "out")
    flags = dict(lora_weights=checkpoint, dataset="SVAMP,boolq", data_dir=data_dir, max_examples=6, max_new_tokens=12, batch_size=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               os.path.join(ROOT, "evaluate.py"), "--output_dir", out]
    command += [f"--{k}={v}" for k, v in flags.items()]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = run(tmp_path / "single", **flags)
    for name in ("SVAMP", "boolq"):
        folder = os.path.join(out, "llama-llama-lora", name)
        assert sorted(os.listdir(folder)) == ["metrics.json", "predictions.jsonl", "settings.json"]
        assert predictions(folder) == predictions(os.path.join(single, "llama-llama-lora", name))
        assert metrics(folder)["world_size"] == 2


def test_data_readme_lists_every_set_with_its_size(shared_data):
    readme = open(os.path.join(ROOT, "data", "README.md")).read()
    for benchmark in answers.BENCHMARKS:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{benchmark.name}` |")), None)
        assert row, f"data/README.md has no row for {benchmark.name}"
        path = os.path.join(shared_data, "eval", benchmark.name, "test.json")
        if os.path.isfile(path):
            size = int(row.split(" | ")[2].replace(",", ""))
            assert size == len(json.load(open(path))), benchmark.name


def test_reference_evaluation_prompt_byte_for_byte():
    """The seed's evaluate.py prompt: one trailing space after the header, empty lines without indent."""
    pad = " " * 16
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
        f"{pad}### Instruction:\n{pad}What is 2+2?\n\n{pad}### Response:\n{pad}"
    )
    assert Prompter.load("llm_adapters_eval").prompt("What is 2+2?") == expected
