"""benchmarks/eval_throughput.py's accounting of each path's forward calls, on a tiny random model."""
import importlib.util
import json
import os

from conftest import ROOT

spec = importlib.util.spec_from_file_location("eval_throughput", os.path.join(ROOT, "benchmarks", "eval_throughput.py"))
eval_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_throughput)


def test_table_counts_each_paths_forward_calls(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    examples, budget = 5, 6
    eval_throughput.main(base_model=tiny_model_dir("llama"), examples=examples, max_new_tokens=budget,
                         data_path=os.path.join(shared_data, "eval", "SVAMP", "test.json"),
                         output=str(tmp_path / "eval_throughput"))
    with open(tmp_path / "eval_throughput.json") as f:
        reference, loop, one, batch16, batch64, beams = json.load(f)["runs"]  # no adapter: no merged rows
    assert (reference["num_beams"], loop["path"], beams["num_beams"]) == (4, "(b) greedy loop with cache", 4)
    assert reference["rows_per_call"] == 4.0  # 4 beams, the whole sequence read again for each token
    assert loop["rows_per_call"] == one["rows_per_call"] == 1.0 and examples <= loop["forward_calls"] <= examples * budget
    assert one["forward_calls"] == loop["forward_calls"] + 1  # the same steps, plus the header read once
    for batched in (batch16, batch64):  # the header, then one call reading the 5 prompts, then a step per token
        assert batched["forward_calls"] <= budget + 1 and batched["rows_per_call"] > 3
        assert batched["outputs_equal"] == f"{examples}/{examples} of (b) greedy loop with cache"
    assert beams["rows_per_call"] == 4 * examples and beams["outputs_equal"] == f"{examples}/{examples} of (a) reference-style loop"
    table = (tmp_path / "eval_throughput.md").read_text()
    assert f"| (c) evaluate.py, batched | 64 | 1 | on | {batch64['forward_calls']} | {batch64['rows_per_call']} |" in table
