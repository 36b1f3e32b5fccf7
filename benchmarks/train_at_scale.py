"""Training at real scale: the seed's resource table (trainable parameters, memory, speed) on a GPU.

    python benchmarks/train_at_scale.py --data_path ../shared/data/train/math_data.json   # LLaMA-7B shape
    python benchmarks/train_at_scale.py --shape tiny --steps 4                            # a CPU check

No weights are downloaded: a LLaMA-7B-shaped model (32 layers, width 4096, MLP 11008, vocabulary 32000)
is random-initialised from its config and saved to --work_dir with the bundled tokenizer, and each setup
then loads it the way finetune.py does (`load_base_model`, NF4 for QLoRA), builds the adapter with
finetune.py's defaults and trains with finetune.py's Trainer at the seed's settings (cutoff 256, micro
batch 4, batch 16; on a GPU in padded batches, as finetune.py). Speed is measured after the first --skip
optimizer steps (CUDA warm-up); memory is the peak allocated by torch in training, the resident weights
included, and on a GPU apart from it the peak while loading and building the adapter.
MFU counts 6·N + 12·layers·width·length FLOPs per token (PaLM's convention, N the parameters less the input
embedding table); a frozen base needs no weight gradients, so 4·N + … of them are actual work ("used").
Figures go to benchmarks/results/train_at_scale.{md,json}.
"""
import argparse
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
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, set_seed  # noqa: E402

from peft_ext import adapters, bundled, training  # noqa: E402
from peft_ext.data import tokenize  # noqa: E402
from peft_ext.modeling import load_base_model, load_tokenizer, parameter_counts  # noqa: E402
from peft_ext.prompts import Prompter  # noqa: E402
from train_throughput import ADAPTER_DEFAULTS, read_data  # noqa: E402  (this folder: the script's own)

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512),
}
# (label, adapter, 4-bit): the seed's table has LoRA and AdapterH; QLoRA is LoRA on the NF4 base.
SETUPS = [("LoRA (bf16)", "lora", False), ("QLoRA (NF4 base)", "lora", True), ("AdapterH (bf16)", "adapterh", False)]
# The seed's resource table (LLaMA-7B, two RTX 3090, math_10k, 3 epochs), from its README.
SEED_TABLE = {"lora": "4.2M params, 18 GB, 4 h", "adapterh": "200M params, 22 GB, 4 h"}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, per the vendor's data sheets


def make_model(shape: str, folder: str) -> str:
    """A random-initialised model of `shape` with the bundled tokenizer, saved as a model folder."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer(bundled.BASE_MODEL).save_pretrained(folder)
    del model
    return folder


class StepClock(TrainerCallback):
    """(seconds, tokens) at the end of every optimizer step, after the device has finished it."""

    def __init__(self):
        self.marks = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(label, adapter, four_bit, model_dir, tokenizer, train_set, args) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = training.prepare_base(load_base_model(model_dir, load_4bit=four_bit), quantized=four_bit,
                                  checkpointing=False)
    set_seed(args.seed)
    model = adapters.build(model, adapter, ADAPTER_DEFAULTS)
    trainable, total = parameter_counts(model)
    loading_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # training's own peak from here, the resident weights included
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = training.make_trainer(
            model, tokenizer, train_set, None, output_dir=output_dir, micro_batch_size=args.micro_batch_size,
            accumulation=args.batch_size // args.micro_batch_size, num_epochs=1, max_steps=args.skip + args.steps,
            learning_rate=3e-4, warmup_steps=0, eval_step=1, save_step=10**9, save_total_limit=1,
            group_by_length=False, checkpointing=False, seed=args.seed, report=training.Reporting(["none"], None),
        )
        trainer.add_callback(clock)
        trainer.train()
    (t0, n0), (t1, n1) = clock.marks[args.skip - 1], clock.marks[-1]
    tokens_per_second = (n1 - n0) / (t1 - t0)
    config = model.get_base_model().config
    embedding = config.vocab_size * config.hidden_size
    mean_length = sum(len(ids) for ids in train_set["input_ids"]) / len(train_set)
    attention = 12 * config.num_hidden_layers * config.hidden_size * mean_length
    n = total - embedding
    peak = peak_tflops()
    mfu = (6 * n + attention) * tokens_per_second / (peak * 1e12) if peak else None
    used = (4 * n + 2 * trainable + attention) * tokens_per_second / (peak * 1e12) if peak else None
    memory, kind = training.peak_memory()
    row = {
        "setup": label, "adapter": adapter, "four_bit": four_bit, "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total, "tokens_per_second": tokens_per_second,
        "seconds_per_step": (t1 - t0) / args.steps, "mfu": mfu, "used_flops_utilization": used,
        "peak_memory_gib": memory / 2**30, "memory_kind": kind,
        "loading_peak_gib": loading_peak / 2**30 if loading_peak is not None else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "seed_table": SEED_TABLE.get(adapter, ""),
    }
    del model, trainer
    return row


def markdown(rows, meta) -> str:
    lines = [f"`{meta['command']}`", "", meta["conditions"], "",
             "| setup | trainable params | % of model | peak memory (GiB) | tokens/s | s per step | MFU (6N) | "
             "used FLOPs (4N) | seed's table |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setup']} | failed: {r['error']} | | | | | | | |")
            continue
        pct = lambda x: f"{100 * x:.1f}%" if x is not None else "—"  # noqa: E731
        loading = lambda r: f"; loading: {r['loading_peak_gib']:.1f}" if r.get("loading_peak_gib") else ""  # noqa: E731
        lines.append(f"| {r['setup']} | {r['trainable_params'] / 1e6:.2f}M | {r['trainable_percent']:.3f}% | "
                     f"{r['peak_memory_gib']:.1f} ({r['memory_kind']}{loading(r)}) | {r['tokens_per_second']:.0f} | "
                     f"{r['seconds_per_step']:.2f} | {pct(r['mfu'])} | {pct(r['used_flops_utilization'])} | "
                     f"{r['seed_table']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "llm-adapters-scale"),
                        help="where the random-initialised model is saved (kept for reuse)")
    parser.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "train", "math_data.json"))
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps measured")
    parser.add_argument("--skip", type=int, default=3, help="optimizer steps run before measuring")
    parser.add_argument("--setups", default="all", help="comma-separated indexes into the setups, or all")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "train_at_scale"))
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    records = read_data(parser, args.data_path)
    model_dir = make_model(args.shape, os.path.join(args.work_dir, args.shape))
    tokenizer = load_tokenizer(model_dir)
    records = records.select(range(min(len(records), args.batch_size * (args.skip + args.steps))))
    train_set = tokenize(records, tokenizer, Prompter.load("alpaca"), args.cutoff_len, train_on_inputs=True)
    chosen = SETUPS if args.setups == "all" else [SETUPS[int(i)] for i in args.setups.split(",")]
    rows = []
    for label, adapter, four_bit in chosen:
        try:
            rows.append(measure(label, adapter, four_bit, model_dir, tokenizer, train_set, args))
        except Exception as e:  # one setup failing (say, no bitsandbytes kernel) still reports the others
            rows.append({"setup": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(json.dumps(rows[-1]), flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    mean_length = sum(len(ids) for ids in train_set["input_ids"]) / len(train_set)
    meta = {"command": "python benchmarks/train_at_scale.py " + " ".join(sys.argv[1:]),
            "conditions": f"{args.shape}-shaped model, random init; {device}; peak bf16 {peak_tflops()} TFLOP/s; "
                          f"{len(train_set)} math_data examples of {mean_length:.0f} tokens on average (bundled "
                          f"tokenizer), cutoff {args.cutoff_len}, micro batch {args.micro_batch_size}, batch "
                          f"{args.batch_size}; {args.steps} steps measured after {args.skip}; torch {torch.__version__}, "
                          f"transformers {transformers.__version__}"}
    table = markdown(rows, meta)
    print(table)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=1)
    with open(args.output + ".md", "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
