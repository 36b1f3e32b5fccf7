"""Score a model on the LLM-Adapters benchmark sets: batched, resumable, one command for a whole table.

    python evaluate.py --lora_weights ./trained_models/llama-lora --dataset SVAMP
    python evaluate.py --lora_weights ./trained_models/llama-lora --dataset math --batch_size 32
    python evaluate.py --base_model ./merged-or-base-model --dataset boolq,piqa
    torchrun --nproc_per_node 4 evaluate.py --lora_weights ... --dataset commonsense
"""
if __name__ == "__main__":  # first, and only when run: Ctrl-C while the libraries load ends in one line
    import peft_ext.quiet_start  # noqa: F401

import os

from peft_ext import answers, bundled
from peft_ext.checkpoint import adapter_dir_flag, load_for_inference, resolve_checkpoint
from peft_ext.errors import UsageError, run_cli
from peft_ext.evaluation import (
    METRICS,
    Evaluation,
    Ranks,
    append_result,
    dataset_items,
    paper_table,
    resolve_tasks,
)
from peft_ext.files import check_writable, run_folder, write_text_atomic
from peft_ext.modeling import parse_dtype


def main(
    dataset: str = "",
    base_model: str = "",
    lora_weights: str = "",
    weights_path: str = "",
    model: str = "",
    adapter: str = "",
    data_dir: str = bundled.DATA_DIR,
    output_dir: str = "experiment",
    prompt_template_name: str = "",
    batch_size: int = 16,
    num_beams: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 0,
    answer_rule: str = "strict",
    max_examples: int = 0,
    skip_missing: bool = False,
    overwrite: bool = False,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: str = "auto",
    seed: int = 42,
    trust_remote_code: bool = False,
):
    """Score a base model plus an adapter checkpoint (finetune.py's output_dir, which names its base
    model, template and tokenizer), or a plain or merged model given as --base_model alone.

    --dataset takes names (AddSub, MultiArith, SingleEq, gsm8k, AQuA, SVAMP, mawps, boolq, piqa,
    social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa, and the bundled synth_math; any case, and the paper's
    column names), `math`, `commonsense`, comma lists, or paths to test.json files; names are read from
    DATA_DIR/NAME/test.json (data/README.md says how to fetch them).

    Decoding is greedy by default. In bfloat16 or float16 (a GPU's default --dtype) a few percent of greedy
    responses change with the batch size, from rounding; --dtype float32 makes them batch-independent.
    To reproduce the reference: --num_beams 4, --answer_rule paper (AQuA's
    first capital letter; peft_ext/answers.py documents both rules) and, for checkpoints trained with its
    code, --prompt_template_name llm_adapters_eval (its evaluation prompt's whitespace). Results go to
    OUTPUT_DIR/MODEL-ADAPTER/DATASET/ (predictions.jsonl, settings.json, metrics.json), a row per
    finished set to OUTPUT_DIR/results.csv, and for a suite the paper's table to
    OUTPUT_DIR/MODEL-ADAPTER/SUITE.md. Run the same command again to continue an interrupted run.

    Args:
        dataset: set names, `math`, `commonsense`, or test.json paths, comma-separated (see above).
        base_model: base or merged model directory or hub id (default: the checkpoint's run.json / adapter_config.json).
        lora_weights: the adapter checkpoint directory (finetune.py's output_dir); none: the base model alone.
        weights_path: the seed's other name for --lora_weights.
        model: label of the run in tables, and in folder names with characters other than letters, digits and ._+- as _ (default: the base model's folder name).
        adapter: label of the run in folders and tables (default: the checkpoint's folder name, RUN-checkpoint-N for a run's checkpoint-N/, or "base").
        data_dir: where set names are looked up, as DATA_DIR/NAME/test.json (default: this project's data/ folder, from wherever evaluate.py runs).
        output_dir: where predictions, metrics, results.csv and the suite tables go.
        prompt_template_name: template in templates/ or a JSON path (default: the checkpoint's prompt_template.json, else alpaca).
        batch_size: examples decoded together; halved and continued if the GPU runs out of memory.
        num_beams: beam search width (1: greedy or sampling; the reference used 4).
        temperature: 0: greedy (or beam search); above 0: sampling at this temperature.
        max_new_tokens: answer budget in tokens (0: each set's default, 256 math, 32 commonsense).
        answer_rule: AQuA's letter extraction: strict (default) or paper (the reference's first capital A-E).
        max_examples: score only the first N examples of each set (0: all).
        skip_missing: leave sets whose file is absent out of a suite instead of stopping.
        overwrite: discard earlier predictions of these sets instead of resuming them.
        load_8bit: load the base model in 8-bit (bitsandbytes).
        load_4bit: load the base model in 4-bit NF4 (bitsandbytes).
        dtype: auto (bfloat16, or float16, on a GPU; float32 on a CPU), float32, bfloat16 or float16; float32 makes greedy output batch-independent.
        seed: random seed for sampling.
        trust_remote_code: allow model code from the hub (off by default: it runs foreign code).
    """
    # parse
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 0 or temperature < 0 or max_examples < 0:
        raise UsageError("--batch_size and --num_beams must be at least 1, --max_new_tokens, --temperature and "
                         "--max_examples at least 0")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir!r} is a file; choose a folder")
    check_writable(output_dir)
    torch_dtype = parse_dtype(dtype)
    checkpoint = resolve_checkpoint(base_model, adapter_dir_flag(lora_weights, weights_path), prompt_template_name)
    tasks, missing = resolve_tasks(dataset, data_dir, max_examples, skip_missing)
    model_label = model or os.path.basename(os.path.normpath(checkpoint.base_model))
    adapter_label = adapter or checkpoint.adapter_label
    run = Evaluation(
        run_dir=os.path.join(output_dir, run_folder(model_label, adapter_label)),
        identity={**checkpoint.identity(torch_dtype), "load_8bit": load_8bit, "load_4bit": load_4bit},
        num_beams=num_beams,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        answer_rule=answers.check_rule(answer_rule),
        batch_size=batch_size,
        seed=seed,
    )
    ranks = Ranks()
    if overwrite and ranks.main:
        for task in tasks:
            run.discard(task)
    ranks.barrier()
    metrics = {task.benchmark.name: run.finished(task) for task in tasks}
    pending = [task for task in tasks if metrics[task.benchmark.name] is None]
    ranks.barrier()  # every rank has read the predictions before rank 0 writes the sets scored from them
    if ranks.main:
        for task in tasks:
            scored = metrics[task.benchmark.name]
            if scored and "scored_from" in scored:
                metrics[task.benchmark.name] = run.save_scored(task, scored, ranks.world)
            if scored:  # the row of a set finished before, in case that run stopped before it wrote it
                append_result(output_dir, metrics[task.benchmark.name], model_label, adapter_label, checkpoint.prompter.name)

    # load (only when there is work: a finished run answers in seconds)
    if pending:
        lm, tokenizer = load_for_inference(checkpoint, load_8bit, load_4bit, trust_remote_code, torch_dtype)

    # run
    for task in pending:
        metrics[task.benchmark.name] = result = run.run(task, lm, tokenizer, checkpoint.prompter, ranks)
        if ranks.main:
            append_result(output_dir, result, model_label, adapter_label, checkpoint.prompter.name)
    ranks.close()
    if not ranks.main:
        return

    # save: a line per set, and the paper's table per suite
    for task in tasks:
        m = metrics[task.benchmark.name]
        if m.get("scored_from", 0) > m["n"]:
            how = f" (the first {m['n']} of {m['scored_from']} saved predictions)"
        elif "scored_from" in m:
            how = " (scored again from its saved predictions)"
        else:
            how = f", {m['examples_per_s']:.2f} examples/s" if task in pending and m["examples_per_s"] else " (done before)"
        print(f"{task.benchmark.name}: {100 * m['accuracy']:.1f}% ({m['correct']}/{m['n']}){how}"
              f" -> {os.path.join(run.task_dir(task), METRICS)}")
    for benchmark in missing:
        print(f"{benchmark.name}: skipped, no {os.path.join(data_dir, benchmark.name, 'test.json')}")
    accuracy = {name: m["accuracy"] for name, m in metrics.items()}
    for suite in dict.fromkeys(s.lower() for s in dataset_items(dataset) if s.lower() in answers.SUITES):
        table = paper_table(model_label, adapter_label, suite, accuracy)
        write_text_atomic(os.path.join(run.run_dir, f"{suite}.md"), table)
        print(f"\n{table}")


if __name__ == "__main__":
    run_cli(main, interrupted="every finished prediction is saved; run the same command again to continue")
