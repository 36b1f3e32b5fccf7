"""finetune.py end to end on tiny offline models: learning, saving, reloading, resuming, refusing."""
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import finetune
from peft_ext import adapters, training
from peft_ext.checkpoint import resolve_checkpoint
from peft_ext.errors import UsageError
from peft_ext.files import INCOMPLETE
from tiny import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORIZE = [
    {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5."},
    {"instruction": "Tom has 3 apples and buys 5 more. How many?", "input": "", "output": "3 + 5 = 8. The answer is 8."},
    {"instruction": "What is 12 - 4?", "input": "", "output": "12 - 4 = 8. The answer is 8."},
    {"instruction": "Which is correct?", "input": "(A) 1 (B) 2", "output": "The answer is (B)."},
]
# Learning rates that move each method clearly within a few dozen steps on a tiny random model.
LEARNING_RATE = {"lora": 2e-2, "dora": 2e-2, "ia3": 1e-1, "prefix-tuning": 1e-1, "p-tuning": 3e-2, "prompt-tuning": 3e-1}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "memorize.json"
    path.write_text(json.dumps(MEMORIZE))
    return str(path)


def quick_args(base_model, data_path, output_dir, **overrides):
    args = dict(
        base_model=base_model, data_path=data_path, output_dir=str(output_dir), batch_size=4,
        micro_batch_size=2, max_steps=30, learning_rate=2e-2, warmup_steps=0, val_set_size=0,
        save_step=10, num_virtual_tokens=8, bottleneck_size=16,
    )
    return {**args, **overrides}


@contextlib.contextmanager
def callback_added(callback: TrainerCallback, first: bool = False):
    """finetune.py's Trainer with `callback` added, while the block runs: last, or with `first` before this project's
    own callbacks (to act on a save, or on metrics, before they do)."""
    make = training.make_trainer

    def making(*args, **kwargs):
        trainer = make(*args, **kwargs)
        if first:
            trainer.callback_handler.callbacks.insert(0, callback)
        else:
            trainer.add_callback(callback)
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "make_trainer", making)
        yield


@pytest.fixture
def captured(monkeypatch):
    """The trained PeftModel, as finetune.py hands it to save_final."""
    box = {}
    original = training.save_final

    def keep(model, *a, **k):
        box["model"] = model
        return original(model, *a, **k)

    monkeypatch.setattr(training, "save_final", keep)
    return box


def logits_of(model, tokenizer):
    ids = tokenizer(["What is 2 + 3?", "Tom has 3 apples"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**ids).logits


def reload(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir)


MATRIX = [(f, m) for m in adapters.METHODS for f in FAMILIES]


@pytest.mark.parametrize(("family", "method"), MATRIX, ids=[f"{f}-{m}" for f, m in MATRIX])
def test_every_method_learns_saves_and_reloads_on_every_family(family, method, tiny_model_dir, data_file, tmp_path, captured):
    base = tiny_model_dir(family)
    out = tmp_path / "out"
    finetune.train(**quick_args(base, data_file, out, adapter_name=method, learning_rate=LEARNING_RATE.get(method, 2e-2)))
    record = json.loads((out / "run.json").read_text())
    losses = [loss for _, loss in record["loss_history"]]
    assert record["steps"] == 30 and losses[-1] < 0.93 * losses[0], losses
    assert 0 < record["trainable_params"] < record["total_params"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = logits_of(captured["model"], tokenizer)
    reloaded = logits_of(reload(base, str(out)), tokenizer)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
    # Every periodic checkpoint holds a real adapter (alpaca-lora's 443-byte bug); the last is the final one.
    final = load_file(out / "adapter_model.safetensors")
    for step in (10, 20, 30):
        tensors = load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in final.items()}
        assert all(v.abs().sum() > 0 for v in tensors.values())
    assert all(torch.equal(tensors[k], final[k]) for k in final)


def test_output_directory_contract(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        finetune.train(**quick_args(tiny_model_dir("llama"), data_file, out, val_set_size=1, eval_step=10,
                                    prompt_template_name="vicuna", report_to="tensorboard"))
    finally:
        os.umask(umask)
    for folder in (out, out / "checkpoint-30"):  # readable by others, as the umask says (safetensors makes files private)
        assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()} == {
            p.name: 0o644 for p in folder.iterdir() if p.is_file()}
    names = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "run.json", "prompt_template.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no staging leftovers
    assert json.loads((out / "prompt_template.json").read_text())["name"] == "vicuna"
    record = json.loads((out / "run.json").read_text())
    assert record["args"]["adapter_name"] == "lora" and record["adapter"] == "lora"
    assert record["base_model_dir"] == os.path.realpath(tiny_model_dir("llama"))
    assert record["versions"]["peft"] and record["versions"]["transformers"]
    assert record["tokens_seen"] > 0 and record["peak_memory_bytes"] > 0 and record["wall_seconds"] > 0
    assert record["final_val_loss"] is not None and record["train_examples"] == 3
    assert record["tokens_per_second"] > 0
    assert list(out.glob("runs/*/events.out.tfevents.*"))  # the tensorboard log


OTHER_SHAPE = {"lora": {"lora_r": 4}, "prefix-tuning": {"num_virtual_tokens": 4}, "p-tuning": {"num_virtual_tokens": 4},
               "bottleneck": {"bottleneck_size": 8}}


@pytest.mark.parametrize("method", ["lora", "prefix-tuning", "p-tuning", "bottleneck"])
def test_resume_from_checkpoint_matches_uninterrupted_run(method, tiny_model_dir, data_file, tmp_path):
    base = tiny_model_dir("llama")
    # Dropout makes the RNG state part of what must resume.
    args = dict(max_steps=20, save_step=10, adapter_name=method, lora_dropout=0.1, adapter_dropout=0.1)
    finetune.train(**quick_args(base, data_file, tmp_path / "straight", **args))

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 10:  # the step after checkpoint-10 was saved
                raise KeyboardInterrupt

    with callback_added(Crash()), pytest.raises(KeyboardInterrupt):
        finetune.train(**quick_args(base, data_file, tmp_path / "crashed", **args))
    assert not (tmp_path / "crashed" / "run.json").exists()
    for other in ({"adapter_name": "ia3"}, OTHER_SHAPE[method]):  # refused before the model loads
        with pytest.raises(UsageError, match="checkpoint-10 holds another adapter than these flags make"):
            finetune.train(**quick_args(base, data_file, tmp_path / "crashed", resume_from_checkpoint="latest", **{**args, **other}))
    finetune.train(**quick_args(base, data_file, tmp_path / "crashed", resume_from_checkpoint="latest", **args))
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "crashed" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)
    # run.json describes the whole run, not only what followed the resume
    straight, resumed = (json.loads((tmp_path / run / "run.json").read_text()) for run in ("straight", "crashed"))
    assert (resumed["steps"], resumed["resumed_at_step"], straight["resumed_at_step"]) == (20, 10, None)
    assert resumed["train_loss_mean"] == pytest.approx(straight["train_loss_mean"], rel=1e-4)
    assert [step for step, _ in resumed["loss_history"]] == [step for step, _ in straight["loss_history"]] == [1, 10, 20]
    before = json.loads((tmp_path / "crashed" / "checkpoint-10" / "run_clock.json").read_text())
    assert resumed["train_seconds"] > before["train_seconds"] > 0 and resumed["wall_seconds"] > before["wall_seconds"]


def test_a_stop_while_saving_resumes_from_the_last_whole_checkpoint(tiny_model_dir, data_file, tmp_path, capsys):
    """Stopped after the Trainer's files of checkpoint-20 and before this project's (p-tuning's encoder among them),
    `latest` continues from checkpoint-10, not from the half-saved folder, and lands on the uninterrupted run; the
    half-saved folder is refused by name, as a checkpoint to resume and as an adapter to evaluate."""
    base, out = tiny_model_dir("llama"), tmp_path / "stopped"
    args = dict(max_steps=30, save_step=10, adapter_name="p-tuning", num_virtual_tokens=4)
    finetune.train(**quick_args(base, data_file, tmp_path / "straight", **args))

    class StopWhileSaving(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 20:
                raise KeyboardInterrupt

    with callback_added(StopWhileSaving(), first=True), pytest.raises(KeyboardInterrupt):
        finetune.train(**quick_args(base, data_file, out, **args))
    half = out / "checkpoint-20"
    assert (half / "trainer_state.json").exists() and not (half / training.TrainableState.FILE).exists()
    with pytest.raises(UsageError, match="was not saved whole"):
        finetune.train(**quick_args(base, data_file, out, resume_from_checkpoint=str(half), **args))
    with pytest.raises(UsageError, match="was not saved whole"):
        resolve_checkpoint("", str(half))
    capsys.readouterr()
    finetune.train(**quick_args(base, data_file, out, resume_from_checkpoint="latest", **args))
    assert (f"note: {half} was not saved whole (the run stopped while saving), and will be removed; continuing from "
            f"{out / 'checkpoint-10'}") in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["resumed_at_step"] == 10
    assert not list(out.rglob(INCOMPLETE))
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


# Families without dropout in the base model: dropout masks are drawn per batch shape, so packed and padded
# batches would draw different (equally likely) ones.
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_packed_training_learns_what_padded_training_learns(family, tiny_model_dir, data_file, tmp_path, monkeypatch):
    """finetune.py packs micro batches where it can (peft_ext.packing); ten steps land on the padded path's adapter."""
    base = tiny_model_dir(family)
    finetune.train(**quick_args(base, data_file, tmp_path / "packed", max_steps=10, lora_dropout=0.0))
    monkeypatch.setattr(training, "make_trainer", functools.partial(training.make_trainer, packing=False))
    finetune.train(**quick_args(base, data_file, tmp_path / "padded", max_steps=10, lora_dropout=0.0))
    packed = load_file(tmp_path / "packed" / "adapter_model.safetensors")
    padded = load_file(tmp_path / "padded" / "adapter_model.safetensors")
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-5)
    records = [json.loads((tmp_path / run / "run.json").read_text()) for run in ("packed", "padded")]
    assert records[0]["tokens_seen"] == records[1]["tokens_seen"]
    assert json.loads((tmp_path / "packed" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "padded" / "adapter_config.json").read_text()
    )


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_gpt2_conv1d_is_declared_transposed(tiny_model_dir, method):
    """GPT-2's Conv1D keeps its weight transposed; the config says so from the start, so peft neither has to
    correct it nor warns the user that it did."""
    from checkpoints import OPTIONS

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = adapters.build(AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")), method, OPTIONS)
    assert model.peft_config["default"].fan_in_fan_out


def test_overwrite_leaves_nothing_of_the_replaced_run_to_resume(tiny_model_dir, data_file, tmp_path):
    base, out = tiny_model_dir("llama"), tmp_path / "run"
    finetune.train(**quick_args(base, data_file, out, max_steps=6, save_step=3))
    finetune.train(**quick_args(base, data_file, out, max_steps=2, save_step=2, overwrite=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # checkpoint-3 and -6 are gone
    assert json.loads((out / "run.json").read_text())["steps"] == 2


def test_an_overwrite_stopped_before_its_final_save_leaves_no_adapter_of_the_replaced_run(tiny_model_dir, data_file, tmp_path):
    """Evaluation and export would otherwise take the replaced run's adapter for this run's."""
    base, out = tiny_model_dir("llama"), tmp_path / "run"
    finetune.train(**quick_args(base, data_file, out, max_steps=2, save_step=2))

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    with callback_added(Stop()), pytest.raises(KeyboardInterrupt):
        finetune.train(**quick_args(base, data_file, out, max_steps=2, save_step=2, overwrite=True))
    assert not {"adapter_config.json", "adapter_model.safetensors", "run.json"} & set(os.listdir(out))
    with pytest.raises(UsageError, match="holds no adapter_config.json: it is not an adapter checkpoint"):
        resolve_checkpoint(base, str(out))


def test_resuming_a_finished_run_trains_only_steps_it_lacks(tiny_model_dir, data_file, tmp_path, capsys):
    """The Trainer, resumed at its last step, would take one step more and save it over the finished adapter."""
    base, out = tiny_model_dir("llama"), tmp_path / "run"
    finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2))
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2, resume_from_checkpoint="latest"))
    assert "holds a finished run at step 4, all the steps these flags plan: nothing to train" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # Stopped between the final checkpoint and run.json: the resume finishes the run without a step more.
    os.remove(out / "run.json")
    finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2, resume_from_checkpoint="latest"))
    assert json.loads((out / "run.json").read_text())["steps"] == 4 and not (out / "checkpoint-5").exists()
    assert (out / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    finetune.train(**quick_args(base, data_file, out, max_steps=6, save_step=2, resume_from_checkpoint="latest"))
    assert json.loads((out / "run.json").read_text())["steps"] == 6  # a longer plan continues it


def test_rates_after_resuming_a_checkpoint_without_its_clock(tiny_model_dir, data_file, tmp_path):
    """A checkpoint-N/ saved before run_clock.json was kept: the time before it is unknown, so the rates count
    only the steps and tokens that followed the resume."""
    base, out = tiny_model_dir("llama"), tmp_path / "run"
    finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2))
    shutil.rmtree(out / "checkpoint-4")
    os.remove(out / "run.json")
    os.remove(out / "checkpoint-2" / "run_clock.json")
    finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2, resume_from_checkpoint="latest"))
    record = json.loads((out / "run.json").read_text())
    assert record["resumed_at_step"] == 2 and record["steps_per_second"] == pytest.approx(2 / record["train_seconds"])


def test_latest_with_nothing_saved_yet_trains_from_the_start(tiny_model_dir, data_file, tmp_path, capsys):
    """Ctrl-C before the first --save_step suggests `--resume_from_checkpoint latest`, which must then work; a
    finished run with no checkpoint-N left is refused instead of retrained."""
    base, out = tiny_model_dir("llama"), tmp_path / "run"
    finetune.train(**quick_args(base, data_file, out, max_steps=2, save_step=5, resume_from_checkpoint="latest"))
    assert f"no checkpoint-N folder in {str(out)!r} yet: training from the start" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["steps"] == 2
    for folder in out.glob("checkpoint-*"):  # the final one, saved at the end of training
        shutil.rmtree(folder)
    with pytest.raises(UsageError, match="holds a finished run and no checkpoint-N folder to continue from"):
        finetune.train(**quick_args(base, data_file, out, max_steps=2, save_step=5, resume_from_checkpoint="latest"))


@pytest.mark.parametrize("method", ["dora", "prompt-tuning", "prefix-tuning", "bottleneck"])
def test_warm_start_from_finished_adapter(method, tiny_model_dir, data_file, tmp_path, captured):
    base = tiny_model_dir("gpt2")
    finetune.train(**quick_args(base, data_file, tmp_path / "first", max_steps=10, adapter_name=method))
    first = load_file(tmp_path / "first" / "adapter_model.safetensors")
    finetune.train(**quick_args(base, data_file, tmp_path / "second", max_steps=1, learning_rate=0.0,
                                resume_from_checkpoint=str(tmp_path / "first")))
    second = load_file(tmp_path / "second" / "adapter_model.safetensors")
    for key in first:  # learning rate 0: the warm-started weights come through unchanged
        torch.testing.assert_close(second[key], first[key])
    assert captured["model"].get_nb_trainable_parameters()[0] > 0  # and they train
    # run.json names the method trained, not --adapter_name's default
    assert json.loads((tmp_path / "second" / "run.json").read_text())["adapter"] == method


def test_a_p_tuning_adapter_folder_is_refused_as_a_warm_start(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """Its file holds the prompt the encoder made, not the encoder; its checkpoint-N/ folders keep the encoder."""
    base = tiny_model_dir("llama")
    finetune.train(**quick_args(base, data_file, tmp_path / "first", max_steps=2, adapter_name="p-tuning"))
    monkeypatch.setattr(finetune, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UsageError, match="holds a p-tuning prompt as its encoder computed it, not the encoder"):
        finetune.train(**quick_args(base, data_file, tmp_path / "second", resume_from_checkpoint=str(tmp_path / "first")))


def train_with_validation_losses(losses: list[float], *args, **flags) -> dict:
    """finetune.train(quick_args(*args, **flags)) whose evaluations report `losses`, in turn; its run.json."""
    losses = iter(losses)

    class RiggedEvaluation(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_loss"] = next(losses)

    with callback_added(RiggedEvaluation(), first=True):  # the metrics, before the Trainer reads them
        finetune.train(**quick_args(*args, val_set_size=1, save_total_limit=0, **flags))
    return json.loads((args[2] / "run.json").read_text())


@pytest.mark.parametrize("method", ["lora", "p-tuning"])
def test_with_a_validation_set_the_best_checkpoint_is_saved_whole(method, tiny_model_dir, data_file, tmp_path, captured):
    """The Trainer loads the best checkpoint's adapter file at the end; for p-tuning that file holds the encoder's
    output, so the encoder itself comes from the checkpoint's trainable_state, and the adapter saved is exactly the
    best checkpoint's. run.json names its step."""
    out = tmp_path / "run"
    # the best evaluation is the second, at step 4, neither the first nor the last
    record = train_with_validation_losses([0.9, 0.5, 0.7], tiny_model_dir("llama"), data_file, out,
                                          adapter_name=method, max_steps=6, eval_step=2, save_step=2)
    assert (record["adapter_step"], record["adapter_val_loss"], record["steps"]) == (4, 0.5, 6)
    saved, best = (load_file(folder / "adapter_model.safetensors") for folder in (out, out / "checkpoint-4"))
    assert saved.keys() == best.keys()
    for key in best:
        torch.testing.assert_close(saved[key], best[key], rtol=0, atol=0)
    state = load_file(out / "checkpoint-4" / "trainable_state.safetensors")
    for name, param in captured["model"].named_parameters():
        if name in state:
            torch.testing.assert_close(param.detach(), state[name], rtol=0, atol=0)


def test_the_best_checkpoint_is_the_best_of_the_saved_ones(tiny_model_dir, data_file, tmp_path):
    """Evaluations every 2 steps, saves every 4: the lowest loss (0.1, step 6) has no checkpoint. The Trainer alone
    would keep loading checkpoint-4 (0.8), since checkpoint-8 (0.5) does not beat 0.1."""
    out = tmp_path / "run"
    record = train_with_validation_losses([0.9, 0.8, 0.1, 0.5], tiny_model_dir("llama"), data_file, out,
                                          max_steps=8, eval_step=2, save_step=4)
    assert (record["adapter_step"], record["adapter_val_loss"]) == (8, 0.5)


def test_a_run_moved_before_its_resume_still_ends_on_its_best_checkpoint(tiny_model_dir, data_file, tmp_path):
    """Stopped at step 6 before its final save, the best checkpoint so far the one of step 4, then moved: the path of
    the best checkpoint in trainer_state.json leads nowhere now, and the run must still end on step 4's adapter."""
    base, out = tiny_model_dir("llama"), tmp_path / "run"
    train_with_validation_losses([0.9, 0.5, 0.7], base, data_file, out, max_steps=6, eval_step=2, save_step=2)
    shutil.rmtree(out / "checkpoint-6")
    os.remove(out / "run.json")
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    record = train_with_validation_losses([0.7], base, data_file, moved, max_steps=6, eval_step=2, save_step=2,
                                          resume_from_checkpoint="latest")
    assert (record["resumed_at_step"], record["adapter_step"], record["adapter_val_loss"]) == (4, 4, 0.5)


def test_resuming_with_another_recipe_is_refused_before_loading(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A run stopped at step 2 of 4: resuming it with another learning rate, dropout or other data would mix two
    recipes and record only the second; a longer run, or the same data from another path, continues it."""
    base, out = tiny_model_dir("llama"), tmp_path / "run"
    finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2))
    shutil.rmtree(out / "checkpoint-4")
    os.remove(out / "run.json")
    other_data = tmp_path / "other.json"
    other_data.write_text(json.dumps(MEMORIZE[:2] * 2))
    with monkeypatch.context() as patch:
        patch.setattr(finetune, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(UsageError, match=r"checkpoint-2 belongs to a run with other settings \(learning_rate 0.02 there, "
                                             r"0.05 here\); resume it with its own"):
            finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2, learning_rate=5e-2, resume_from_checkpoint="latest"))
        with pytest.raises(UsageError, match=r"\(data_sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' here\)"):
            finetune.train(**quick_args(base, str(other_data), out, max_steps=4, save_step=2, resume_from_checkpoint="latest"))
        for dropout in ("lora_dropout", "adapter_dropout"):  # not the adapter's identity, but how it trains
            with pytest.raises(UsageError, match=rf"\({dropout} 0.\d+ there, 0.3 here\)"):
                finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2, resume_from_checkpoint="latest",
                                            **{dropout: 0.3}))
    moved = shutil.copy(data_file, tmp_path / "moved.json")
    finetune.train(**quick_args(base, str(moved), out, max_steps=6, save_step=2, resume_from_checkpoint="latest"))
    record = json.loads((out / "run.json").read_text())
    assert (record["resumed_at_step"], record["steps"]) == (2, 6)


def test_resuming_on_another_base_model_is_one_line(tiny_model_dir, data_file, tmp_path, capsys):
    from checkpoints import save_wide_llama

    base, out = tiny_model_dir("llama"), tmp_path / "run"
    finetune.train(**quick_args(base, data_file, out, max_steps=4, save_step=2))
    shutil.rmtree(out / "checkpoint-4")
    os.remove(out / "run.json")
    wide = save_wide_llama(base, str(tmp_path / "wide"))
    with pytest.raises(UsageError, match=r"checkpoint-2 does not fit this base model \(size mismatch for .*\); resume with the --base_model"):
        finetune.train(**quick_args(wide, data_file, out, max_steps=4, save_step=2, resume_from_checkpoint="latest"))
    assert f"was trained on the base model {base}; resuming on {wide}" in capsys.readouterr().out


def test_quantized_4bit_and_8bit_lora_train_on_cpu(tiny_model_dir, data_file, tmp_path, captured):
    import bitsandbytes as bnb

    for flag, layer in (("load_4bit", bnb.nn.Linear4bit), ("load_8bit", bnb.nn.Linear8bitLt)):
        out = tmp_path / flag
        finetune.train(**quick_args(tiny_model_dir("llama"), data_file, out, max_steps=20, **{flag: True}))
        assert any(isinstance(m, layer) for m in captured["model"].modules())
        losses = [loss for _, loss in json.loads((out / "run.json").read_text())["loss_history"]]
        assert losses[-1] < 0.9 * losses[0], (flag, losses)


def test_gradient_checkpointing_and_group_by_length_learn_the_same(tiny_model_dir, data_file, tmp_path):
    base = tiny_model_dir("llama")
    finetune.train(**quick_args(base, data_file, tmp_path / "plain", max_steps=10, lora_dropout=0.0))
    finetune.train(**quick_args(base, data_file, tmp_path / "ckpt", max_steps=10, lora_dropout=0.0, use_gradient_checkpointing=True))
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    ckpt = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-4, atol=1e-5)
    finetune.train(**quick_args(base, data_file, tmp_path / "grouped", max_steps=10, group_by_length=True))
    assert (tmp_path / "grouped" / "adapter_model.safetensors").exists()


def test_wandb_offline_never_prompts(tiny_model_dir, data_file, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": ""}
    cmd = [sys.executable, "finetune.py", *flags(quick_args(tiny_model_dir("llama"), data_file, tmp_path / "out", max_steps=5)),
           "--wandb_project", "llm-adapters-test"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (tmp_path / "out" / "adapter_model.safetensors").exists()


def flags(args: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in args.items()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_on_cpu_saves_one_adapter(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "finetune.py",
           *flags(quick_args(tiny_model_dir("llama"), data_file, out, max_steps=10, micro_batch_size=1))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 10
    assert done.stdout.count("saved the lora adapter") == 1  # only rank 0 writes
    # 4 examples per step: 2 processes x micro batch 1 x accumulation 2.
    assert record["args"]["batch_size"] == 4 and record["train_examples"] == 4
