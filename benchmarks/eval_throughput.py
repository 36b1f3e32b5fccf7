"""Evaluation throughput: the reference's decoding loop against evaluate.py's batched path.

In one process, on the same model and the same SVAMP prompts (math budget: 256 new tokens):
  (a) a loop written like the reference evaluate.py: one example at a time, 4 beams, no KV cache;
  (b) evaluate.py's own path one example at a time: greedy, KV cache;
  (c) evaluate.py's batched path, greedy, at batch 16 and 64 (the same outputs as (b) are required);
  (d) evaluate.py's batched path with the reference's 4 beams, at batch 16 (compared with (a)).
Prints a Markdown table of examples/s and the ratios, and writes it with the run's conditions to
benchmarks/results/eval_throughput.{md,json}.

    python benchmarks/eval_throughput.py                       # the tiny random LLaMA of the tests
    python benchmarks/eval_throughput.py --base_model PATH --threads 16
"""
import json
import os
import platform
import sys
import tempfile
import time

import torch
import transformers
from transformers import GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from peft_ext import answers  # noqa: E402
from peft_ext.checkpoint import load_for_inference, resolve_checkpoint  # noqa: E402
from peft_ext.errors import run_cli  # noqa: E402
from peft_ext.evaluation import PREDICTIONS, Evaluation, Ranks, load_task  # noqa: E402
from peft_ext.generation import cut_at_stops  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def reference_loop(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...]) -> list[str]:
    """The reference's decoding: one prompt at a time, no attention mask, 4 beams, the cache off. Its
    temperature/top_p/top_k have no effect (do_sample is unset), so they are left out here."""
    config = GenerationConfig(num_beams=4, max_new_tokens=max_new_tokens, use_cache=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    responses = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, generation_config=config)
        text = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
        responses.append(cut_at_stops(text, stop).strip())
    return responses


def evaluate_path(model, tokenizer, prompter, task, budget: int, batch_size: int, num_beams: int) -> list[str]:
    """evaluate.py's path (sorting, batching, predictions.jsonl) into a throwaway folder."""
    with tempfile.TemporaryDirectory() as folder:
        run = Evaluation(folder, identity={}, num_beams=num_beams, max_new_tokens=budget, batch_size=batch_size)
        run.run(task, model, tokenizer, prompter, Ranks())
        with open(os.path.join(run.task_dir(task), PREDICTIONS)) as f:
            return [json.loads(line)["response"] for line in f]


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a shared machine CPU time shows the work
    done even when other jobs stretch the wall time."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(base_model: str = "", data_path: str = os.path.join(ROOT, "..", "shared", "data", "eval", "SVAMP", "test.json"),
         examples: int = 64, max_new_tokens: int = 0, threads: int = 1):
    torch.set_num_threads(threads)
    if not base_model:
        from tiny import save_tiny_model

        base_model = save_tiny_model("llama", os.path.join(tempfile.mkdtemp(), "tiny-llama"))
        model_name = "tiny random LLaMA (tests/tiny.py: 2 layers, hidden 32, vocab 320)"
    else:
        model_name = base_model
    checkpoint = resolve_checkpoint(base_model)
    model, tokenizer = load_for_inference(checkpoint)
    prompter = checkpoint.prompter
    task = load_task(data_path, answers.get("SVAMP"), examples)
    budget = max_new_tokens or task.benchmark.max_new_tokens
    prompts = [prompter.prompt(r["instruction"], r.get("input")) for r in task.examples]
    stop = tuple(prompter.template.get("stop", [])) + (prompter.template["response_split"],)

    runs = []  # (label, batch, beams, cache, outputs, wall seconds, CPU seconds)
    runs.append(("(a) reference-style loop", 1, 4, "off", *timed(lambda: reference_loop(model, tokenizer, prompts, budget, stop))))
    for label, batch, beams in [("(b) evaluate.py, one at a time", 1, 1), ("(c) evaluate.py, batched", 16, 1),
                                ("(c) evaluate.py, batched", 64, 1), ("(d) evaluate.py, batched, 4 beams", 16, 4)]:
        runs.append((label, batch, beams, "on", *timed(lambda: evaluate_path(model, tokenizer, prompter, task, budget, batch, beams))))

    n = len(prompts)
    speed = {i: n / r[5] for i, r in enumerate(runs)}
    # Ratios of the work each path costs: CPU time on a CPU, whose wall time other jobs may stretch;
    # wall time on a GPU, where the CPU time is mostly waiting.
    basis, cost = ("wall", 5) if torch.cuda.is_available() else ("CPU time", 6)
    ratio = {i: runs[0][cost] / r[cost] for i, r in enumerate(runs)}
    rows = [f"| path | batch | beams | KV cache | wall s | CPU s | examples/s | × (a), {basis} | × (b), {basis} | outputs equal to |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for i, (label, batch, beams, cache, outputs, seconds, cpu) in enumerate(runs):
        same_as = 0 if beams == 4 else 1
        equal = "—" if i == same_as else f"{sum(x == y for x, y in zip(outputs, runs[same_as][4]))}/{n} of {'(a)' if same_as == 0 else '(b)'}"
        rows.append(f"| {label} | {batch} | {beams} | {cache} | {seconds:.1f} | {cpu:.1f} | {speed[i]:.2f} | "
                    f"{ratio[i]:.1f}× | {ratio[i] / ratio[1]:.1f}× | {equal} |")
    conditions = (f"{n} SVAMP prompts, up to {budget} new tokens, model: {model_name}; device: "
                  f"{'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
                  f"{threads} torch thread(s) on a {os.cpu_count()}-core {platform.machine()} machine "
                  f"(load average {os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}, "
                  f"transformers {transformers.__version__}")
    table = "\n".join(rows) + f"\n\n{conditions}\n"
    print(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "eval_throughput.md"), "w") as f:
        f.write(table)
    with open(os.path.join(RESULTS_DIR, "eval_throughput.json"), "w") as f:
        json.dump({"conditions": conditions, "runs": [
            {"path": r[0], "batch_size": r[1], "num_beams": r[2], "kv_cache": r[3], "seconds": round(r[5], 2),
             "cpu_seconds": round(r[6], 2), "examples_per_s": round(speed[i], 3), f"speedup_over_a_{basis}": round(ratio[i], 2),
             f"speedup_over_b_{basis}": round(ratio[i] / ratio[1], 2)}
            for i, r in enumerate(runs)]}, f, indent=2)


if __name__ == "__main__":
    run_cli(main)
