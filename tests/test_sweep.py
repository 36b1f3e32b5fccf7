"""benchmarks/sweep.py: two adapters, one set, on the tiny llama; tables and plots agree with the run
records, a finished sweep does nothing the second time, an interrupted adapter resumes, and bad input
ends in one line."""
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from peft_ext import bundled
from peft_ext.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "benchmarks", "sweep.py"))
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

ADAPTERS = ["lora", "adapterh"]


def sweep_args(base_model, output_dir):
    return dict(
        base_model=base_model, data_path=bundled.TRAIN_DATA, datasets=bundled.TEST_DATA,
        adapters=",".join(ADAPTERS), output_dir=str(output_dir),
        max_steps=4, batch_size=4, micro_batch_size=4, finetune_args="--save_step 2 --val_set_size 0",
        max_examples=4, evaluate_args="--max_new_tokens 8",
    )


@pytest.fixture(scope="module")
def finished(llama, tmp_path_factory):
    """(sweep arguments, output folder) of a finished sweep."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    args = sweep_args(llama, out)
    with pytest.MonkeyPatch.context() as patch:
        # One thread per child process: a second one buys a tiny model nothing and costs a lot on a busy machine.
        patch.setenv("OMP_NUM_THREADS", "1")
        sweep.main(**args)
    return args, out


def read_csv(path):
    with open(path) as f:
        return {row["adapter"]: row for row in csv.DictReader(f)}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def file_times(folder):
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, names in os.walk(folder) for n in names}


def test_tables_and_plots_agree_with_run_and_metrics_files(finished):
    _, out = finished
    resources, accuracy = read_csv(out / "resources.csv"), read_csv(out / "accuracy.csv")
    resources_md, accuracy_md = (out / "resources.md").read_text(), (out / "accuracy.md").read_text()
    assert list(resources) == ADAPTERS and list(accuracy) == ADAPTERS
    for adapter in ADAPTERS:
        run = read_json(out / adapter / "run.json")
        row = resources[adapter]
        assert run["adapter"] == ("lora" if adapter == "lora" else "bottleneck")
        assert int(row["trainable_params"]) == run["trainable_params"] > 0
        assert float(row["trainable_percent"]) == pytest.approx(run["trainable_percent"], abs=1e-4)
        assert float(row["peak_memory_mib"]) == pytest.approx(run["peak_memory_bytes"] / 2**20, abs=0.1)
        assert float(row["wall_seconds"]) == pytest.approx(run["wall_seconds"], abs=0.1)
        assert float(row["cpu_seconds"]) == pytest.approx(run["cpu_seconds"], abs=0.1) and run["cpu_seconds"] > 0
        assert float(row["tokens_per_second"]) == pytest.approx(run["tokens_per_second"], abs=0.1)
        assert int(row["steps"]) == run["steps"] == 4
        assert f"| {adapter} | {run['trainable_params']:,} |" in resources_md

        metrics = read_json(out / "eval" / f"llama-{adapter}" / "synth_math" / "metrics.json")
        assert metrics["n"] == 4
        assert float(accuracy[adapter]["synth_math"]) == pytest.approx(100 * metrics["accuracy"], abs=0.01)
        assert float(accuracy[adapter]["Avg"]) == pytest.approx(100 * metrics["accuracy"], abs=0.01)
        assert f"| {adapter} | {100 * metrics['accuracy']:.1f} |" in accuracy_md
    for image in ("accuracy.png", "loss.png"):
        with open(out / image, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_finished_sweep_runs_nothing_and_answers_in_seconds(finished, monkeypatch):
    args, out = finished
    tables = {name: (out / name).read_text() for name in ("resources.md", "resources.csv", "accuracy.md", "accuracy.csv")}
    before = {path: t for path, t in file_times(out).items() if os.path.dirname(path) != str(out)}

    def no_process(*a, **k):
        raise AssertionError(f"a finished sweep started {a}")

    monkeypatch.setattr(sweep.subprocess, "run", no_process)
    started = time.perf_counter()
    sweep.main(**args)
    assert time.perf_counter() - started < 5
    after = file_times(out)
    assert {path: after[path] for path in before} == before  # checkpoints, run.json, predictions, metrics
    assert {name: (out / name).read_text() for name in tables} == tables


def test_an_interrupted_adapter_resumes_from_its_checkpoint(finished, tmp_path, monkeypatch):
    args, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    lora = copy / "lora"
    # As if stopped after step 2: checkpoint-2/ saved, no final adapter and no evaluation yet.
    shutil.rmtree(lora / "checkpoint-4")
    for name in ("run.json", "adapter_model.safetensors", "adapter_config.json"):
        os.remove(lora / name)
    checkpoint_times = file_times(lora / "checkpoint-2")
    adapterh_times = file_times(copy / "adapterh")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep.main(**{**args, "output_dir": str(copy)})
    run = read_json(lora / "run.json")
    assert run["args"]["resume_from_checkpoint"] == "latest" and run["steps"] == 4
    assert file_times(lora / "checkpoint-2") == checkpoint_times
    assert file_times(copy / "adapterh") == adapterh_times  # the finished adapter was left alone
    metrics = read_json(copy / "eval" / "llama-lora" / "synth_math" / "metrics.json")
    assert float(read_csv(copy / "accuracy.csv")["lora"]["synth_math"]) == pytest.approx(100 * metrics["accuracy"], abs=0.01)


def test_a_finished_adapter_with_other_settings_is_refused_not_reported(finished, tmp_path):
    args, out = finished
    with pytest.raises(UsageError, match="lora run made with other settings \\(learning_rate differ\\)"):
        sweep.main(**{**args, "learning_rate": 0.5})


def test_flags_come_from_the_paper_then_the_bundled_scaling_then_the_user():
    paper = sweep.training_flags("lora", "m", "d", False, "llama", {}, "")
    assert (paper["lora_r"], paper["learning_rate"]) == (32, 3e-4)
    assert paper["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert "target_modules" not in sweep.training_flags("lora", "m", "d", False, "gpt2", {}, "")

    bundled = sweep.training_flags("adapterh", "m", "d", True, "llama", {"learning_rate": None}, "")
    assert (bundled["bottleneck_size"], bundled["learning_rate"], bundled["train_on_inputs"]) == (32, 1e-3, False)

    per_adapter = {"all": "--cutoff_len 64", "prefix-tuning": "--num_virtual_tokens=20 --use_x"}
    prefix = sweep.training_flags("prefix-tuning", "m", "d", True, "llama", {"max_steps": 7}, per_adapter)
    lora = sweep.training_flags("lora", "m", "d", True, "llama", {"max_steps": 7}, per_adapter)
    assert (prefix["num_virtual_tokens"], prefix["use_x"], prefix["cutoff_len"], prefix["max_steps"]) == ("20", "True", "64", 7)
    assert "num_virtual_tokens" not in lora and lora["cutoff_len"] == "64"
    with pytest.raises(UsageError, match="not a --flag"):
        sweep.parse_flags("--lora_r 16 32")
    assert sweep.parse_flags("--val-set-size=0 --lora-r 16") == {"val_set_size": "0", "lora_r": "16"}  # as fire reads them
    given = sweep.training_flags("lora", "m", "d", True, "llama", {}, "--lora_r 16 --lora_dropout 0.1")
    sweep.check_adapters({"lora": given})  # numbers typed in --finetune_args are numbers to finetune.py
    with pytest.raises(UsageError, match="--adapters lora: --lora_r must be a whole number at least 1, got 0"):
        sweep.check_adapters({"lora": sweep.training_flags("lora", "m", "d", True, "llama", {}, "--lora_r 0")})
    shouted = sweep.training_flags("prefix_tuning", "m", "d", True, "llama", {}, {"ALL": "--cutoff_len 64", "Prefix-Tuning": "--use_x"})
    assert (shouted["cutoff_len"], shouted["use_x"]) == ("64", "True")  # keys match as --adapters names match


@pytest.mark.parametrize("flags, message", [
    (["--evaluate_args=--output_dir=/tmp/elsewhere --max_new_tokens=4"], "--evaluate_args cannot set --output_dir"),
    (["--finetune_args=--output_dir /tmp/elsewhere"], "--finetune_args cannot set --output_dir"),
    (['--finetune_args={"lora": "--adapter_name dora"}'], "--finetune_args cannot set --adapter_name"),
    # a typo in one adapter's flags fails before the adapters listed before it train
    (['--finetune_args={"parallel": "--lora_rr 16"}'], "--finetune_args: finetune.py has no flag --lora_rr; did you mean --lora_r?"),
    (["--evaluate_args=--num-beam=4"], "--evaluate_args: evaluate.py has no flag --num_beam; did you mean --num_beams?"),
    (["--finetune_args=--output-dir=/tmp/elsewhere"], "--finetune_args cannot set --output_dir"),
])
def test_flags_the_sweep_sets_itself_are_refused(flags, message, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep.py"), "--output_dir", str(tmp_path / "s"), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {message}") and not (tmp_path / "s").exists()


def test_bad_input_ends_with_one_line_and_exit_status_2():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep.py"), "--eval_batch_size", "0"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "error: --eval_batch_size must be at least 1 and --max_examples at least 0\n"


def test_a_misspelt_adapter_fails_before_any_training(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep.py"), "--adapters", "lora,lorra",
                           "--output_dir", str(tmp_path / "sweep")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: --adapters lorra: unknown --adapter_name 'lorra'")
    assert not (tmp_path / "sweep" / "lora").exists()  # nothing trained


def test_an_evaluation_of_data_that_changed_since_is_not_taken(finished, tmp_path):
    """A test file rewritten in place (the same path, other answers) is evaluated again, where evaluate.py refuses to
    mix in the predictions scored on the old contents, instead of its old accuracy being tabulated."""
    args, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run_dir = str(copy / "eval" / "llama-lora")
    asked = {"dataset": args["datasets"], "flags": read_json(os.path.join(run_dir, sweep.SWEEP_RECORD))["asked"]["flags"]}
    assert sweep.eval_record(run_dir, asked) is not None
    metrics_path = os.path.join(run_dir, "synth_math", "metrics.json")
    metrics = read_json(metrics_path)
    metrics["settings"]["data_sha256"] = "0" * 64  # as if scored on other contents of the same file
    with open(metrics_path, "w") as f:
        json.dump(metrics, f)
    assert sweep.eval_record(run_dir, asked) is None


def test_skip_missing_in_evaluate_args_reaches_the_sets_the_sweep_expects(shared_data, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(shared_data, "eval", "SVAMP"), partial / "SVAMP")
    assert sweep.benchmark_names("math", [f"--data_dir={partial}", "--skip_missing=True"]) == ["SVAMP"]
    with pytest.raises(UsageError, match="has no AddSub/test.json"):
        sweep.benchmark_names("math", [f"--data_dir={partial}"])


def test_a_second_sweep_into_a_busy_folder_is_refused(finished, tmp_path):
    """Two sweeps in one folder would train the same adapters into the same folders."""
    from peft_ext.files import folder_lock

    args, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    with folder_lock(str(copy)):  # a sweep running there
        with pytest.raises(UsageError, match=f"another sweep is running in {copy}; wait for it"):
            sweep.main(**{**args, "output_dir": str(copy)})
    sweep.main(**{**args, "output_dir": str(copy)})  # and once it is done, this one runs (finds all done)


def test_a_script_that_refuses_its_input_is_told_how_to_get_flags():
    """evaluate.py's refusal says "pass --overwrite True"; inside a sweep that goes through --evaluate_args."""
    with pytest.raises(UsageError, match=r"exit status 2 \(its output is above\); a flag it asks for goes to it through --evaluate_args$"):
        sweep.run([sys.executable, "-c", "raise SystemExit(2)"], "evaluate.py for lora", "--evaluate_args")
    with pytest.raises(UsageError, match=r"exit status 1 \(its output is above\)$"):  # a crash: no flag helps
        sweep.run([sys.executable, "-c", "raise SystemExit(1)"], "finetune.py for lora", "--finetune_args")
