"""Evaluation throughput: the reference's decoding loop against evaluate.py's batched path.

In one process, on the same model and the same SVAMP prompts (math budget: 256 new tokens):
  (a) a loop written like the reference evaluate.py: one example at a time, 4 beams, no KV cache;
  (b) the plain greedy loop with the cache: one example at a time, transformers' generate;
  (b') evaluate.py's own path one example at a time (its own decoding loop, which reads the template
       header once for all examples);
  (c) evaluate.py's batched path, greedy, at batch 16 and 64 (the same outputs as (b) are required);
  (d) evaluate.py's batched path with the reference's 4 beams, at batch 16 (compared with (a));
and, for a mergeable adapter, (b), (b') and (c) again with the adapter merged into the base weights (what
evaluate.py runs on export_hf_checkpoint.py's output). Prints a Markdown table of examples/s and the
ratios, and writes it with the run's conditions to benchmarks/results/eval_throughput.{md,json}.

    python benchmarks/eval_throughput.py        # bundled tiny-math + its LoRA (trained here first if absent)
    python benchmarks/eval_throughput.py --lora_weights ./trained_models/llama-lora --threads 16
    python benchmarks/eval_throughput.py --base_model PATH                 # a base or merged model alone
    python benchmarks/eval_throughput.py --dtype bfloat16                  # evaluate.py's dtype on a recent GPU
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if __name__ == "__main__":  # before torch, and only when run: Ctrl-C while the libraries load ends in one line
    import peft_ext.quiet_start  # noqa: F401

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from peft_ext import answers, bundled  # noqa: E402
from peft_ext.checkpoint import load_for_inference, resolve_checkpoint  # noqa: E402
from peft_ext.errors import UsageError, run_cli  # noqa: E402
from peft_ext.evaluation import PREDICTIONS, Evaluation, Ranks, load_task  # noqa: E402
from peft_ext.export import check_mergeable  # noqa: E402
from peft_ext.generation import cut_at_stops  # noqa: E402
from peft_ext.modeling import parse_dtype  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
SVAMP = (os.path.join(ROOT, "..", "shared", "data", "eval", "SVAMP", "test.json"),  # beside a checkout, as in CI
         os.path.join(bundled.DATA_DIR, "SVAMP", "test.json"))  # where data/README.md fetches it
BENCH_ADAPTER = os.path.join(ROOT, "trained_models", "eval-bench-lora")
# finetune.py's offline default recipe (models/tiny-math/README.md), spelled out so that this adapter
# stays the same whatever finetune.py's defaults become; no validation set: it only costs time here.
TRAIN_FLAGS = ["--base_model", bundled.BASE_MODEL, "--data_path", bundled.TRAIN_DATA, "--adapter_name", "lora",
               "--learning_rate", "1e-3", "--train_on_inputs", "False", "--batch_size", "16",
               "--micro_batch_size", "16", "--num_epochs", "3", "--val_set_size", "0", "--save_step", "1000"]


def bench_adapter() -> str:
    """The LoRA adapter of tiny-math that this benchmark measures, trained by finetune.py when absent
    (about 3 minutes of one CPU core): a model that ends its answers at EOS, as fine-tuned models do."""
    if not os.path.isfile(os.path.join(BENCH_ADAPTER, "run.json")):
        print(f"training the benchmark's adapter into {BENCH_ADAPTER} (finetune.py, a few minutes)", flush=True)
        command = [sys.executable, os.path.join(ROOT, "finetune.py"), *TRAIN_FLAGS, "--output_dir", BENCH_ADAPTER,
                   "--overwrite", "True"]
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return BENCH_ADAPTER


def generate_loop(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...],
                  num_beams: int, use_cache: bool) -> list[str]:
    """One prompt at a time through transformers' generate, without an attention mask, as the reference
    did: (a) with its 4 beams and the cache off (its temperature/top_p/top_k have no effect, do_sample
    being unset, so they are left out), (b) greedy with the cache."""
    config = GenerationConfig(num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens, use_cache=use_cache,
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


def main(base_model: str = "", lora_weights: str = "", data_path: str = "",
         examples: int = 64, max_new_tokens: int = 0, threads: int = 1, dtype: str = "float32",
         output: str = os.path.join(RESULTS_DIR, "eval_throughput")):
    """Measure on --lora_weights (default: tiny-math's LoRA, trained first if absent) or --base_model alone,
    in --dtype: float32 by default, where batched greedy output equals one at a time (in bfloat16 a few percent
    of responses change with the batch size, which the "outputs equal" column then shows). --data_path
    defaults to SVAMP's test.json in ../shared/data/eval/ or else in data/ (data/README.md says how to fetch
    it); the table goes to OUTPUT.md and OUTPUT.json."""
    data_path = data_path or next((path for path in SVAMP if os.path.isfile(path)), SVAMP[-1])
    torch.set_num_threads(threads)
    # The tokenizer's thread pool (batch encoding and decoding) would add its threads' CPU time, which swings
    # with the machine's load, to a measurement made on `threads` torch threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.isfile(data_path):
        raise UsageError(f"{data_path} does not exist; data/README.md says how to fetch SVAMP into data/SVAMP/, "
                         "or pass --data_path")
    adapter_dir = lora_weights or ("" if base_model else bench_adapter())
    checkpoint = resolve_checkpoint(base_model, adapter_dir)
    model, tokenizer = load_for_inference(checkpoint, dtype=parse_dtype(dtype))
    prompter = checkpoint.prompter
    task = load_task(data_path, answers.get("SVAMP"), examples)
    budget = max_new_tokens or task.benchmark.max_new_tokens
    prompts = [prompter.prompt(r["instruction"], r.get("input")) for r in task.examples]
    stop = tuple(prompter.template.get("stop", [])) + (prompter.template["response_split"],)

    def evaluate_run(label: str, batch: int, beams: int, same_as: str | None, weights: str = "adapter", role: str = "") -> Run:
        return Run(label, batch, beams, "on", same_as,
                   lambda model: evaluate_path(model, tokenizer, prompter, task, budget, batch, beams), weights, role)

    def greedy_runs(who: str, weights: str) -> list[Run]:
        """(b), (b') and (c) at batch 16 and 64; (b') and every (c) must give (b)'s outputs."""
        loop = "(b) merged adapter, greedy loop with cache" if weights == "merged" else "(b) greedy loop with cache"
        return [Run(loop, 1, 1, "on", None, lambda model: generate_loop(model, tokenizer, prompts, budget, stop, 1, True),
                    weights, role="b"),
                evaluate_run(f"(b') {who}, one at a time", 1, 1, loop, weights, role="b'"),
                evaluate_run(f"(c) {who}, batched", 16, 1, loop, weights), evaluate_run(f"(c) {who}, batched", 64, 1, loop, weights)]

    reference = Run("(a) reference-style loop", 1, 4, "off", None,
                    lambda model: generate_loop(model, tokenizer, prompts, budget, stop, 4, False), role="a")
    runs = [reference, *greedy_runs("evaluate.py", "adapter"), evaluate_run("(d) evaluate.py, batched, 4 beams", 16, 4, reference.label)]
    for run in runs:
        run.measure(model)
    if adapter_dir and mergeable(adapter_dir):
        merged_runs = greedy_runs("merged adapter", "merged")
        merged = model.merge_and_unload()  # last: this changes `model` in place
        for run in merged_runs:
            run.measure(merged)
        runs += merged_runs

    lengths = [len(ids) for ids in tokenizer(runs[1].responses)["input_ids"]]
    shown = [os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
             for path in (checkpoint.base_model, checkpoint.adapter_dir) if path]  # this repository's paths, relative
    model_name = " + ".join(shown)
    conditions = (f"{len(prompts)} SVAMP prompts, up to {budget} new tokens; model: {model_name}; greedy responses "
                  f"of {sum(lengths) / len(lengths):.0f} tokens on average (longest {max(lengths)}); device: "
                  f"{'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, {model.dtype}, "
                  f"{threads} torch thread(s), TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}, "
                  f"on a {os.cpu_count()}-core {platform.machine()} machine "
                  f"(load average {os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}, "
                  f"transformers {transformers.__version__}")
    write_table(runs, conditions, output)


@dataclass
class Run:
    """One measured path; `same_as` names the run whose responses these must equal."""

    label: str
    batch: int
    beams: int
    kv_cache: str
    same_as: str | None
    decode: Callable[..., list[str]]  # model -> responses
    weights: str = "adapter"  # or "merged": the adapter folded into the base weights
    role: str = ""  # "a", "b" or "b'": a baseline the ratios are taken against
    responses: list[str] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    calls: list[int] = field(default_factory=list)  # rows of each forward call of the model

    def measure(self, model) -> None:
        """Wall and CPU seconds of this process (on a shared machine, CPU time shows the work done even when
        other jobs stretch the wall time), and the model's forward calls: a count that no machine changes,
        and where a step's cost hardly depends on its rows (a large model on a GPU), what the time follows."""
        network = model.get_base_model() if hasattr(model, "get_base_model") else model
        hook = network.register_forward_pre_hook(
            lambda module, args, kwargs: self.calls.append(len(kwargs.get("input_ids", args[0] if args else None))),
            with_kwargs=True)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            self.responses = self.decode(model)
        finally:
            self.wall, self.cpu = time.perf_counter() - wall, time.process_time() - cpu
            hook.remove()


def mergeable(adapter_dir: str) -> bool:
    try:
        check_mergeable(adapter_dir)
        return True
    except UsageError:
        return False


def write_table(runs: list[Run], conditions: str, output: str) -> None:
    """Print the table and write it, with the run's conditions, to OUTPUT.md and OUTPUT.json."""
    # Ratios of the work each path costs: CPU time on a CPU, whose wall time other jobs may stretch;
    # wall time on a GPU, where the CPU time is mostly waiting.
    basis = "wall" if torch.cuda.is_available() else "CPU time"
    cost = (lambda run: run.wall) if basis == "wall" else (lambda run: run.cpu)  # noqa: E731
    # × (b) and × (b'): against the one-at-a-time runs of the same weights (merged rows against merged ones)
    baseline = {(run.role, run.weights): run for run in runs if run.role}
    responses = {run.label: run.responses for run in runs}
    n = len(runs[0].responses)
    rows = [f"| path | batch | beams | KV cache | forward calls | rows per call | wall s | CPU s | examples/s | "
            f"× (a), {basis} | × (b), {basis} | × (b'), {basis} | outputs equal to |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    records = []
    for run in runs:
        equal = sum(x == y for x, y in zip(run.responses, responses[run.same_as])) if run.same_as else None
        ratios = {role: round(cost(baseline[role, "adapter" if role == "a" else run.weights]) / cost(run), 2)
                  for role in ("a", "b", "b'")}
        per_call = sum(run.calls) / len(run.calls)
        record = dict(path=run.label, batch_size=run.batch, num_beams=run.beams, kv_cache=run.kv_cache,
                      forward_calls=len(run.calls), rows_per_call=round(per_call, 1), seconds=round(run.wall, 2),
                      cpu_seconds=round(run.cpu, 2), examples_per_s=round(n / run.wall, 3),
                      speedup_over_a=ratios["a"], speedup_over_b=ratios["b"], speedup_over_b_evaluate=ratios["b'"],
                      outputs_equal=f"{equal}/{n} of {run.same_as.split(',')[0]}" if run.same_as else "—")
        records.append(record)
        over = " | ".join(f"{ratios[role]:.1f}×" for role in ("a", "b", "b'"))
        rows.append(f"| {run.label} | {run.batch} | {run.beams} | {run.kv_cache} | {len(run.calls):,} | {per_call:.1f} | "
                    f"{run.wall:.2f} | {run.cpu:.2f} | "
                    f"{n / run.wall:.2f} | {over} | {record['outputs_equal']} |")
    table = "\n".join(rows) + f"\n\n{conditions}\n"
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".md", "w") as f:
        f.write(table)
    with open(output + ".json", "w") as f:
        json.dump({"conditions": conditions, "ratio_basis": basis, "runs": records}, f, indent=2)


if __name__ == "__main__":
    run_cli(main)
