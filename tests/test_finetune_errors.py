"""Bad input to finetune.py: one clear line on stderr, a non-zero exit, and nothing written."""
import json
import os
import subprocess
import sys

import pytest

import finetune
from peft_ext.errors import UsageError
from tiny import without_eos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = [{"instruction": "What is 2 + 3?", "input": "", "output": "The answer is 5."}] * 4


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("bad")
    (d / "good.json").write_text(json.dumps(GOOD))
    (d / "malformed.json").write_text('[{"instruction": "x", "output": "y"},')
    (d / "no_output.json").write_text(json.dumps([{"instruction": "x", "input": ""}]))
    (d / "empty.json").write_text("[]")
    (d / "a_file").write_text("I am a file")
    (d / "latin1.json").write_bytes('[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"))
    (d / "list_template.json").write_text("[1, 2]")
    (d / "odd_placeholder.json").write_text(json.dumps({"prompt_input": "{instruction} {context}", "prompt_no_input": "{instruction}",
                                                        "response_split": "### Response:"}))
    template = {"prompt_input": "{instruction}\n{input}\n", "prompt_no_input": "{instruction}\n", "response_split": "\n"}
    (d / "no_input_placeholder.json").write_text(json.dumps({**template, "prompt_input": "{instruction}\n"}))
    (d / "no_instruction_placeholder.json").write_text(json.dumps({**template, "prompt_no_input": "Answer:\n"}))
    (d / "misspelt_key.json").write_text(json.dumps({**template, "stops": ["###"]}))
    (d / "numeric_output.json").write_text(json.dumps([{"instruction": "2+3?", "output": 5}]))
    (d / "bad_turns.json").write_text(json.dumps([{"conversations": "hello"}]))
    # seed 42 holds out the last of four records: here the one whose prompt fills --cutoff_len
    (d / "long_last.json").write_text(json.dumps(GOOD[:3] + [{"instruction": "word " * 300, "output": "x"}]))
    (d / "list_input.json").write_text(json.dumps([{"instruction": "Sum these", "input": [1, 2], "output": "3"}]))
    (d / "run" / "checkpoint-4").mkdir(parents=True)
    (d / "run" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (d / "run" / "checkpoint-7").mkdir()  # stopped while saving: the adapter written, the trainer state not
    (d / "run" / "checkpoint-7" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    without_eos(tiny_model_dir("llama"), str(d / "no_eos"))
    return {"dir": d, "model": tiny_model_dir("llama")}


CASES = {
    "missing data file": ({"data_path": "{dir}/nope.json"}, "does not exist"),
    "malformed JSON": ({"data_path": "{dir}/malformed.json"}, "neither JSON nor JSON Lines"),
    "record lacking output": ({"data_path": "{dir}/no_output.json"}, "lacks 'output'"),
    "empty dataset": ({"data_path": "{dir}/empty.json"}, "holds no records"),
    "unknown adapter": ({"adapter_name": "loraa"}, "unknown --adapter_name"),
    "unknown template": ({"prompt_template_name": "alpacca"}, "unknown prompt template"),
    "template not an object": ({"prompt_template_name": "{dir}/list_template.json"}, "must be a JSON object"),
    "data not UTF-8": ({"data_path": "{dir}/latin1.json"}, "is not UTF-8 text"),
    "unknown placeholder": ({"prompt_template_name": "{dir}/odd_placeholder.json"}, "uses ['context'], but may hold only"),
    "template drops the input": ({"prompt_template_name": "{dir}/no_input_placeholder.json"},
                                 "'prompt_input' lacks {{input}}, so what it stands for would be left out of every text"),
    "template drops the instruction": ({"prompt_template_name": "{dir}/no_instruction_placeholder.json"},
                                       "'prompt_no_input' lacks {{instruction}}"),
    "template key misspelt": ({"prompt_template_name": "{dir}/misspelt_key.json"},
                              ("has the unknown key(s) ['stops']; the keys are chat_assistant, chat_system, "
                               "chat_system_message, chat_user, description, name, output, prompt_input, prompt_no_input, "
                               "response_split, stop")),
    "numeric output": ({"data_path": "{dir}/numeric_output.json"}, "has a non-text 'output'"),
    "conversation not a list": ({"data_path": "{dir}/bad_turns.json"}, "'conversations' must be a list of turns"),
    "input a list": ({"data_path": "{dir}/list_input.json"}, "has an 'input' that is a list, not text"),
    "targets match nothing": ({"target_modules": "[q_proj,qq_proj]"}, "match no layer"),
    "batch not divisible": ({"batch_size": 6, "micro_batch_size": 4}, "not a multiple of --micro_batch_size"),
    "cutoff_len not positive": ({"cutoff_len": 0}, "--cutoff_len must be positive"),
    "no epochs": ({"max_steps": -1, "num_epochs": 0}, "--num_epochs must be positive"),
    "zero steps": ({"max_steps": 0}, "--max_steps must be positive, or -1"),
    "negative learning rate": ({"learning_rate": -1e-4}, "--learning_rate must be at least 0"),
    "negative warmup": ({"warmup_steps": -5}, "--warmup_steps must be a whole number of steps"),
    "LoRA rank 0": ({"lora_r": 0}, "--lora_r must be a whole number at least 1"),
    "LoRA alpha 0": ({"lora_alpha": 0}, "--lora_alpha must be a whole number at least 1"),
    "parallel switch on LoRA": ({"use_parallel_adapter": True}, ("--use_parallel_adapter sets up bottleneck adapters, "
                                                                 "which lora is not; pass --adapter_name parallel")),
    "AdapterP switch on DoRA": ({"adapter_name": "dora", "use_adapterp": True}, "pass --adapter_name adapterp"),
    "LoRA dropout 1.5": ({"adapter_name": "dora", "lora_dropout": 1.5}, "--lora_dropout must be a number from 0 up to"),
    "no virtual tokens": ({"adapter_name": "prompt-tuning", "num_virtual_tokens": 0}, "--num_virtual_tokens must be"),
    "adapter dropout 1": ({"adapter_name": "adapterp", "adapter_dropout": 1.0}, "--adapter_dropout must be a number"),
    "val set 1.5": ({"val_set_size": 1.5}, "--val_set_size must be a count or a fraction"),
    "output dir is a file": ({"output_dir": "{dir}/a_file"}, "is a file"),
    "output dir under a file": ({"output_dir": "{dir}/a_file/out"}, "cannot be made: {dir}/a_file is a file"),
    "missing base model": ({"base_model": "{dir}/no_model"}, "does not exist"),
    "tokenizer without EOS": ({"base_model": "{dir}/no_eos"}, ("has no EOS token, so the model would never learn to "
                                                               "stop; name one as \"eos_token\" in its tokenizer_config.json")),
    "val set too big": ({"val_set_size": 4}, "leaves no training data"),
    "val set left empty": ({"data_path": "{dir}/long_last.json", "val_set_size": 1},
                           "no validation example has a response token within --cutoff_len 256; raise --cutoff_len"),
    "8 and 4 bit": ({"load_8bit": True, "load_4bit": True}, "exclude each other"),
    "SIBO without its site": ({"embedding_lambda": 0.1}, ("SIBO on LoRA mixes into the LoRA branch of up_proj, which is "
                                                          "not a LoRA target here")),
    "serial adapter with no placement": ({"adapter_name": "adapterh", "target_modules": "q_proj"},
                                         "no serial bottleneck placement for 'model.layers.0.self_attn.q_proj'"),
    "prefix tuning with gradient checkpointing": ({"adapter_name": "prefix", "use_gradient_checkpointing": True},
                                                  "prefix tuning cannot train with --use_gradient_checkpointing"),
    "resume from nothing": ({"resume_from_checkpoint": "{dir}"}, "neither a checkpoint-N folder nor an adapter folder"),
    "resume a half-saved checkpoint": ({"resume_from_checkpoint": "{dir}/run/checkpoint-7"}, "was not saved whole"),
    "output into a checkpoint": ({"output_dir": "{dir}/run/checkpoint-4"}, "is a checkpoint of a run; to continue that run pass"),
}


def run_finetune(args: dict, dir) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "finetune.py"] + [f"--{k}={str(v).format(dir=dir)}" for k, v in args.items()]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_anything_is_written(case, files, tmp_path, monkeypatch):
    """...and before the model loads, which takes minutes for a large one."""
    overrides, expected = CASES[case]
    monkeypatch.setattr(finetune, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    args = {"base_model": files["model"], "data_path": "{dir}/good.json", "output_dir": str(out),
            "batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "val_set_size": 0, **overrides}
    args = {k: v.format(dir=files["dir"]) if isinstance(v, str) else v for k, v in args.items()}
    with pytest.raises(UsageError) as refused:
        finetune.train(**args)
    assert expected.format(dir=files["dir"]) in str(refused.value) and "\n" not in str(refused.value)
    assert not out.exists()


def test_command_line_error_is_one_line_on_stderr_and_exit_2(files, tmp_path):
    done = run_finetune({"base_model": files["model"], "data_path": "{dir}/malformed.json",
                         "output_dir": str(tmp_path / "out")}, files["dir"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "neither JSON nor JSON Lines" in errors[0]
    assert not (tmp_path / "out").exists()


def test_misspelt_flag_is_refused_before_training(files, tmp_path):
    """fire alone would train with the default epochs and complain of `--num_epoch` only at the end."""
    done = run_finetune({"base_model": files["model"], "data_path": "{dir}/good.json", "num_epoch": 1,
                         "output_dir": str(tmp_path / "out")}, files["dir"])
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: finetune.py has no flag --num_epoch; did you mean --num_epochs? `python finetune.py --help` lists its flags")
    assert not (tmp_path / "out").exists()


def test_refuses_to_train_over_a_finished_run(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    done = run_finetune({"base_model": files["model"], "data_path": "{dir}/good.json", "output_dir": str(out),
                         "val_set_size": 0}, files["dir"])
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert os.listdir(out) == ["run.json"] and (out / "run.json").read_text() == "{}"


def test_a_warm_start_refuses_to_train_over_a_run(files, tmp_path):
    """Without --overwrite it would replace the run's adapter and run.json and leave its checkpoint-N behind, for
    `latest` to continue under the new run's record."""
    out = tmp_path / "out"
    (out / "checkpoint-6").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(UsageError, match="already holds a run, which a warm start from .* would train over; replace it "
                                         "with --overwrite"):
        finetune.train(base_model=files["model"], data_path=str(files["dir"] / "good.json"), output_dir=str(out),
                       resume_from_checkpoint=str(tmp_path / "adapter"))
    assert sorted(os.listdir(out)) == ["checkpoint-6", "run.json"]


@pytest.mark.parametrize(("family", "limit"), [("gpt2", 512), ("opt", 512), ("gptj", 512), ("llama", None), ("bloom", None)])
def test_position_limit_is_where_a_forward_pass_starts_to_fail(family, limit, tiny_model_dir):
    """GPT-2 and OPT learn a table of positions (OPT's has 2 rows more, an offset), GPT-J precomputes its rotary one;
    LLaMA's RoPE and BLOOM's ALiBi compute them, for any length."""
    import torch
    from transformers import AutoModelForCausalLM

    from peft_ext.modeling import load_skeleton, position_limit

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family))
    assert position_limit(load_skeleton(model.config)) == limit
    if limit:
        model(torch.zeros(1, limit, dtype=torch.long))
        with pytest.raises((IndexError, RuntimeError)):
            model(torch.zeros(1, limit + 1, dtype=torch.long))


class ModelLoaded(Exception):
    pass


@pytest.mark.parametrize(("family", "adapter_name", "cutoff_len", "refusal"), [
    ("gpt2", "lora", 1024, "an example of 1024 tokens is longer than {model!r} can read (512 positions); lower --cutoff_len to 512"),
    ("opt", "lora", 1024, "an example of 1024 tokens is longer than {model!r} can read (512 positions); lower --cutoff_len to 512"),
    ("gpt2", "prompt-tuning", 500, ("an example of 500 tokens and 30 virtual tokens is longer than {model!r} can read "
                                    "(512 positions); lower --cutoff_len to 482")),
    ("llama", "lora", 1024, None),
])
def test_examples_longer_than_a_position_table_are_refused_before_the_model_loads(
        family, adapter_name, cutoff_len, refusal, tiny_model_dir, tmp_path, monkeypatch):
    """Training would fail at the first such example with an IndexError, after the model loaded."""
    (tmp_path / "long.json").write_text(json.dumps([{"instruction": "Count.", "output": "word " * 600}] * 4))
    monkeypatch.setattr(finetune, "load_base_model", lambda *a, **k: (_ for _ in ()).throw(ModelLoaded()))
    model = tiny_model_dir(family)
    with pytest.raises(UsageError if refusal else ModelLoaded) as refused:
        finetune.train(base_model=model, data_path=str(tmp_path / "long.json"), output_dir=str(tmp_path / "out"),
                       adapter_name=adapter_name, cutoff_len=cutoff_len, val_set_size=0, batch_size=2, micro_batch_size=2)
    if refusal:
        assert str(refused.value) == refusal.format(model=model)
