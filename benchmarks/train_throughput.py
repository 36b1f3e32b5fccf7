"""Training throughput: an alpaca-lora-style Trainer setup against finetune.py's own path.

    python benchmarks/train_throughput.py                  # tiny-math, 1,024 math examples, cutoff 512
    python benchmarks/train_throughput.py --cutoff_len 256 --rounds 2

In one process, on the same model, adapter init and tokenized examples, each setup trains one epoch:
(a) the usual alpaca-lora setup: HF Trainer, random order, every micro batch padded to its longest;
(b) finetune.py's path, `peft_ext.training.make_trainer` (each micro batch packed into one row);
(c) the same with `packing=False` (length-sorted micro batches, each padded to its longest).
Each reports real (non-pad) tokens per second of training, timed apart from the evaluations, and the
held-out loss every few steps, from which "steps to equal loss" is read. Figures go to
benchmarks/results/train_throughput.{json,md}.
"""
import argparse
import inspect
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft_ext  # noqa: E402,F401  (first: it quiets what bitsandbytes says when transformers imports it)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed  # noqa: E402

import finetune  # noqa: E402
from peft_ext import adapters, training  # noqa: E402
from peft_ext.data import load_data, tokenize  # noqa: E402
from peft_ext.errors import UsageError  # noqa: E402
from peft_ext.modeling import load_base_model, load_tokenizer, precision  # noqa: E402
from peft_ext.prompts import Prompter  # noqa: E402

# finetune.py's defaults for the adapter flags (for LoRA: r 8 on q_proj, v_proj); train_at_scale.py uses them too
ADAPTER_DEFAULTS = {flag: inspect.signature(finetune.train).parameters[flag].default for flag in training.ADAPTER_FLAGS}


# The cost the ratios compare: CPU time on a CPU, which other jobs on a shared machine barely change; wall
# time on a GPU, where the CPU mostly waits.
BASIS = "wall" if torch.cuda.is_available() else "CPU"


class Meter(TrainerCallback):
    """CPU and wall seconds of training alone, and the held-out loss every `every` steps (not timed)."""

    @staticmethod
    def _sync():
        if torch.cuda.is_available():  # a GPU runs behind the Python that queued the work
            torch.cuda.synchronize()

    def __init__(self, model, eval_batches, every):
        self.model, self.eval_batches, self.every = model, eval_batches, every
        self.cpu = self.wall = 0.0
        self.curve = []

    def _start(self):
        self._sync()
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def _stop(self):
        self._sync()
        self.cpu += time.process_time() - self.cpu0
        self.wall += time.perf_counter() - self.wall0

    def on_train_begin(self, args, state, control, **kwargs):
        self.curve.append([0, self.held_out_loss()])
        self._start()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._stop()
            self.curve.append([state.global_step, self.held_out_loss()])
            self._start()

    def on_train_end(self, args, state, control, **kwargs):
        self._stop()

    def held_out_loss(self) -> float:
        """Mean loss per label token over the held-out batches."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.eval_batches:
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += self.model(**{k: v.to(self.model.device) for k, v in batch.items()}).loss.item() * n
                count += n
        self.model.train(was_training)
        return total / count


class CountingCollator:
    """Counts the tokens of the padded batches, to report how much of the work was padding."""

    def __init__(self, collate):
        self.collate, self.padded_tokens = collate, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.padded_tokens += batch["input_ids"].numel()
        return batch


def alpaca_lora_trainer(model, tokenizer, train_set, args, output_dir) -> Trainer:
    """(a) How alpaca-lora's finetune.py trains: Trainer defaults, random order, pad to the longest."""
    arguments = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        num_train_epochs=1,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        optim="adamw_torch",
        bf16=precision() == "bf16",  # as finetune.py: alpaca-lora's fp16 autocast, in bf16 where the GPU has it
        fp16=precision() == "fp16",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        seed=args.seed,
        data_seed=args.seed,
    )
    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    return Trainer(model=model, args=arguments, train_dataset=train_set, data_collator=collator)


def finetune_trainer(model, tokenizer, train_set, args, output_dir, packing=True) -> Trainer:
    """(b) finetune.py's path, called as finetune.py calls it, with no validation set and no saving."""
    return training.make_trainer(
        model, tokenizer, train_set, None,
        output_dir=output_dir, micro_batch_size=args.micro_batch_size,
        accumulation=args.batch_size // args.micro_batch_size, num_epochs=1, max_steps=-1,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, eval_step=1,
        save_step=10**9, save_total_limit=1, group_by_length=False, checkpointing=False, seed=args.seed,
        report=training.Reporting(["none"], None), packing=packing,
    )


SETUPS = {"a": ("(a) alpaca-lora style: random order, pad to longest", alpaca_lora_trainer),
          "b": ("(b) finetune.py path (packed micro batches)", finetune_trainer),
          "c": ("(c) finetune.py path, packing off", lambda *a: finetune_trainer(*a, packing=False))}


def run(setup, tokenizer, train_set, eval_batches, args) -> dict:
    model = training.prepare_base(load_base_model(args.base_model), quantized=False, checkpointing=False)
    set_seed(args.seed)  # the same adapter init in both setups
    model = adapters.build(model, "lora", ADAPTER_DEFAULTS)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SETUPS[setup][1](model, tokenizer, train_set, args, output_dir)
        # The collator of the training batches: the packing one where make_trainer packs.
        attribute = "packed_collator" if getattr(trainer, "packed_collator", None) else "data_collator"
        counter = CountingCollator(getattr(trainer, attribute))
        setattr(trainer, attribute, counter)
        meter = Meter(model, eval_batches, args.eval_every)
        trainer.add_callback(meter)
        trainer.train()
    tokens = trainer.state.num_input_tokens_seen
    return {
        "setup": setup, "steps": trainer.state.global_step, "real_tokens": tokens,
        "padded_tokens": counter.padded_tokens, "cpu_seconds": meter.cpu, "wall_seconds": meter.wall,
        "tokens_per_cpu_second": tokens / meter.cpu, "tokens_per_wall_second": tokens / meter.wall,
        "held_out_loss": meter.curve,
    }


def first_step_at(curve, loss) -> int | None:
    return next((step for step, value in curve if value <= loss), None)


def summarize(runs: list[dict]) -> dict:
    """Per setup: summed seconds over its rounds; steps to reach the held-out loss both setups reach."""
    by = {s: [r for r in runs if r["setup"] == s] for s in SETUPS}
    common = max(r["held_out_loss"][-1][1] for r in runs)  # every run gets at least this low
    rows = {}
    for s, rs in by.items():
        tokens = sum(r["real_tokens"] for r in rs)
        rows[s] = {
            "tokens_per_cpu_second": tokens / sum(r["cpu_seconds"] for r in rs),
            "tokens_per_wall_second": tokens / sum(r["wall_seconds"] for r in rs),
            "cpu_seconds": [round(r["cpu_seconds"], 1) for r in rs],
            "wall_seconds": [round(r["wall_seconds"], 1) for r in rs],
            "padding_percent": 100 * (1 - sum(r["real_tokens"] for r in rs) / sum(r["padded_tokens"] for r in rs)),
            "final_held_out_loss": [round(r["held_out_loss"][-1][1], 4) for r in rs],
            "steps_to_common_loss": [first_step_at(r["held_out_loss"], common) for r in rs],
            "steps": rs[0]["steps"],
        }
    return {"common_loss": common, "rows": rows,
            "ratio_cpu": rows["b"]["tokens_per_cpu_second"] / rows["a"]["tokens_per_cpu_second"],
            "ratio_wall": rows["b"]["tokens_per_wall_second"] / rows["a"]["tokens_per_wall_second"],
            "ratio_c_cpu": rows["c"]["tokens_per_cpu_second"] / rows["a"]["tokens_per_cpu_second"]}


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        f"`{meta['command']}`", "",
        f"{meta['device']}, {meta['threads']} torch thread(s), torch {meta['torch']}, transformers {meta['transformers']}; "
        f"load average {meta['load_before']} before, {meta['load_after']} after.", "",
        f"| setup | real tokens/s (CPU time) | real tokens/s (wall) | × (a), {BASIS} | padding | steps | "
        f"steps to held-out loss {summary['common_loss']:.4f} | final held-out loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    key = "tokens_per_wall_second" if BASIS == "wall" else "tokens_per_cpu_second"
    a = summary["rows"]["a"][key]
    for s, row in summary["rows"].items():
        lines.append(
            f"| {SETUPS[s][0]} | {row['tokens_per_cpu_second']:.0f} | {row['tokens_per_wall_second']:.0f} | "
            f"{row[key] / a:.2f}× | {row['padding_percent']:.1f}% | {row['steps']} | "
            f"{', '.join(str(x) for x in row['steps_to_common_loss'])} | "
            f"{', '.join(str(x) for x in row['final_held_out_loss'])} |"
        )
    return "\n".join(lines) + "\n"


def read_data(parser, data_path: str):
    """load_data's records, or argparse's one-line error and exit status 2, as the scripts give."""
    try:
        return load_data(data_path)
    except UsageError as e:
        parser.error(f"{e} (the default is LLM-Adapters' math_data.json in ../shared/data/train/ beside a checkout)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default=os.path.join(ROOT, "models", "tiny-math"))
    parser.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "train", "math_data.json"))
    parser.add_argument("--examples", type=int, default=1024, help="training examples (the file's first ones)")
    parser.add_argument("--eval_examples", type=int, default=64, help="held-out examples (the ones after those)")
    parser.add_argument("--eval_every", type=int, default=4, help="held-out loss every N optimizer steps")
    parser.add_argument("--cutoff_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of a, b, c, c, b, a order (cancels load drift)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "train_throughput"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args.base_model)
    records = read_data(parser, args.data_path)
    records = records.select(range(args.examples + args.eval_examples))
    encoded = tokenize(records, tokenizer, Prompter.load("alpaca"), args.cutoff_len, train_on_inputs=True)
    train_set = encoded.select(range(args.examples))
    held_out = encoded.select(range(args.examples, len(encoded)))
    tokenizer.padding_side = "right"
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    eval_batches = [pad([held_out[i] for i in range(j, min(j + 16, len(held_out)))]) for j in range(0, len(held_out), 16)]

    load_before = os.getloadavg()[0]
    order = ["a", "b", "c", "c", "b", "a"] * (args.rounds // 2) + ["a", "b", "c"] * (args.rounds % 2)
    runs = []
    for setup in order:
        runs.append(run(setup, tokenizer, train_set, eval_batches, args))
        r = runs[-1]
        print(f"{setup}: {r['real_tokens']} real tokens, {r['cpu_seconds']:.1f} CPU s, {r['wall_seconds']:.1f} wall s, "
              f"held-out loss {r['held_out_loss'][-1][1]:.4f}", flush=True)
    summary = summarize(runs)
    meta = {
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
    }
    table = markdown(summary, meta)
    print(table)
    print(f"ratio (b)/(a): {summary['ratio_cpu']:.2f}× in CPU time, {summary['ratio_wall']:.2f}× in wall time; "
          f"(c)/(a): {summary['ratio_c_cpu']:.2f}× in CPU time")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump({"meta": meta, "args": vars(args), "summary": summary, "runs": runs}, f, indent=1)
    with open(args.output + ".md", "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
