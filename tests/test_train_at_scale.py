"""benchmarks/train_at_scale.py on its tiny shape: the seed's resource table, made the way finetune.py trains."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH_DATA = os.path.join(ROOT, "..", "shared", "data", "train", "math_data.json")


def test_the_resource_table_counts_each_setups_parameters_and_measures_it(tmp_path):
    output = tmp_path / "table"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "train_at_scale.py"), "--shape", "tiny",
               "--steps", "2", "--skip", "1", "--batch_size", "8", "--work_dir", str(tmp_path / "models"),
               "--data_path", MATH_DATA, "--output", str(output)]
    subprocess.run(command, check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    rows = {row["setup"]: row for row in json.loads((tmp_path / "table.json").read_text())["rows"]}

    layers, width = 2, 128  # the tiny shape
    lora = 2 * 8 * (width + width) * layers  # r 8 on q_proj and v_proj (finetune.py's defaults)
    adapterh = 3 * 2 * width * 256 * layers  # bottleneck 256 after gate, up and down projections
    assert [rows[s]["trainable_params"] for s in ("LoRA (bf16)", "QLoRA (NF4 base)", "AdapterH (bf16)")] == [lora, lora, adapterh]
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["peak_memory_gib"] > 0 and row["memory_kind"] == "cpu_rss"
        assert row["loading_peak_gib"] is None  # a process RSS peak cannot be split; a GPU one is
        assert row["trainable_percent"] == 100 * row["trainable_params"] / row["total_params"]
    assert rows["QLoRA (NF4 base)"]["four_bit"] and rows["QLoRA (NF4 base)"]["total_params"] == rows["LoRA (bf16)"]["total_params"]
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 4 and "| LoRA (bf16) | 0.01M |" in table  # header and three setups

    saved = tmp_path / "models" / "tiny" / "model.safetensors"
    first = saved.stat().st_mtime_ns
    subprocess.run(command + ["--setups", "0"], check=True, cwd=tmp_path, capture_output=True)
    assert saved.stat().st_mtime_ns == first  # the random model is made once and reused
