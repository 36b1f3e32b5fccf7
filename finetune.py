"""Fine-tune a causal LM with a parameter-efficient adapter; writes a checkpoint directory.

    python finetune.py      # LoRA on the bundled tiny model and math set, on a CPU in minutes
    python finetune.py --base_model PATH_OR_HUB_ID --data_path math_data.json --adapter_name lora
    torchrun --nproc_per_node=2 finetune.py ...same flags...

The output directory holds the adapter (peft format, safetensors), the tokenizer, the prompt template
and run.json; evaluate.py, generate.py and the export scripts read nothing else.
"""
if __name__ == "__main__":  # first, and only when run: Ctrl-C while the libraries load ends in one line
    import peft_ext.quiet_start  # noqa: F401

import os
import time

import torch
import transformers  # not `from transformers import set_seed`: that loads bitsandbytes before peft_ext quiets it

from peft_ext import adapters, bundled, training
from peft_ext.data import load_data, training_file, training_sets
from peft_ext.distributed import end_process_group
from peft_ext.errors import UsageError, run_cli
from peft_ext.files import file_sha256
from peft_ext.modeling import (
    adopt_pad_token,
    check_position_limit,
    check_quantization,
    load_base_model,
    load_config,
    load_skeleton,
    load_tokenizer,
    parameter_counts,
    read_adapter_config,
)
from peft_ext.prompts import Prompter


def train(
    base_model: str = "",
    data_path: str = "",
    output_dir: str = bundled.OUTPUT_DIR,
    adapter_name: str = "lora",
    load_8bit: bool = False,
    load_4bit: bool = False,
    batch_size: int = 16,
    micro_batch_size: int = None,
    num_epochs: float = 3,
    max_steps: int = -1,
    learning_rate: float = None,
    warmup_steps: int = 100,
    cutoff_len: int = 256,
    val_set_size=120,
    eval_step: int = 200,
    save_step: int = 200,
    save_total_limit: int = 3,
    target_modules=None,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    num_virtual_tokens: int = 30,
    bottleneck_size: int = 256,
    non_linearity: str = "tanh",
    adapter_dropout: float = 0.0,
    use_parallel_adapter: bool = False,
    use_adapterp: bool = False,
    scaling=1.0,
    init_weights: str = "bert",
    embedding_lambda: float = 0.0,
    ffn=None,
    prompt_template_name: str = "alpaca",
    train_on_inputs: bool = None,
    group_by_length: bool = False,
    packing: bool = True,
    use_gradient_checkpointing: bool = False,
    resume_from_checkpoint=None,
    overwrite: bool = False,
    seed: int = 42,
    report_to: str = "none",
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: str = "",
    wandb_log_model: str = "",
    trust_remote_code: bool = False,
):
    """Fine-tune BASE_MODEL on DATA_PATH with one adapter and save it to OUTPUT_DIR.

    Args:
        base_model: local model directory or hub id of the causal LM to adapt (default: the bundled models/tiny-math, with the settings marked "tiny").
        data_path: JSON/JSONL records {instruction, input, output} or ShareGPT conversations, a directory with train.json (or train.jsonl), a .txt file, or a datasets hub id (default: the bundled data/synth_math/train.json).
        output_dir: where the checkpoint directory is written.
        adapter_name: method: lora, dora, ia3, prefix-tuning, p-tuning, prompt-tuning, bottleneck, adapterh, adapterp, parallel, scaled_parallel (case and -/_ do not matter).
        load_8bit: load the base model in 8-bit (bitsandbytes).
        load_4bit: load the base model in 4-bit NF4 with double quantization (QLoRA).
        batch_size: global batch size; gradient accumulation = batch_size / micro_batch_size / world size.
        micro_batch_size: examples per device per forward pass (default 4; tiny 16).
        num_epochs: passes over the training data (may be fractional).
        max_steps: stop after this many optimizer steps (-1: train num_epochs).
        learning_rate: peak learning rate of AdamW, linear decay after warmup (default 3e-4; tiny 1e-3).
        warmup_steps: linear warmup steps.
        cutoff_len: maximum tokens per example; longer ones are truncated, and those left with no response token are dropped (at most the position table of GPT-2, OPT, GPT-Neo and GPT-J).
        val_set_size: validation records held out (blocks of cutoff_len tokens for a .txt file): a count, or a fraction in (0, 1); 0 for none. With a validation set, the adapter saved is the saved checkpoint's with the lowest validation loss (run.json: adapter_step).
        eval_step: evaluate every N steps (when there is a validation set).
        save_step: save a resumable checkpoint-N/ every N steps.
        save_total_limit: keep at most this many checkpoint-N/ folders (0: keep them all).
        target_modules: layers to adapt: '[q_proj,v_proj]', 'q_proj,v_proj' or a list; default per model family.
        lora_r: LoRA/DoRA rank.
        lora_alpha: LoRA/DoRA alpha, a whole number of at least 1 (scaling alpha/r).
        lora_dropout: dropout on the LoRA/DoRA input.
        num_virtual_tokens: virtual tokens of prefix-, p- and prompt tuning.
        bottleneck_size: hidden width of bottleneck adapters.
        non_linearity: activation of bottleneck adapters (any transformers ACT2FN name).
        adapter_dropout: dropout on the bottleneck adapter input.
        use_parallel_adapter: bottleneck adapters beside the layer (Parallel) instead of in series.
        use_adapterp: bottleneck default targets of AdapterP (after the MLP only).
        scaling: bottleneck output scale: a number or 'learned'.
        init_weights: bottleneck init: 'bert' (N(0, 0.02)) or 'mam_adapter' (starts as identity).
        embedding_lambda: SIBO: weight of the initial embeddings mixed into adapter inputs (0 = off).
        ffn: SIBO: inject at the MLP sites (see docs/adapters.md); default decided per method.
        prompt_template_name: template in templates/ (alpaca, alpaca_short, alpaca_legacy, llm_adapters, llm_adapters_eval, vicuna, chatml) or a JSON path.
        train_on_inputs: put loss on the prompt tokens too; False trains on the response only (default True; tiny False).
        group_by_length: draw each step's examples from a similar length (without it, a step's random examples are still cut into length-sorted micro batches).
        packing: on a CPU, put each micro batch's examples in one row without padding, attention kept within each example (the same loss and gradients; LoRA, DoRA, (IA)3 and bottleneck adapters on llama, mistral, qwen2, opt, gpt2 and gpt_neox; other cases, and GPUs, where it is slower, use padded batches).
        use_gradient_checkpointing: recompute activations in backward to save memory (not with prefix tuning).
        resume_from_checkpoint: a checkpoint-N/ folder (full resume), 'latest' (the newest whole one in output_dir; from the start when none is saved yet), or a finished adapter folder (warm start).
        overwrite: replace a run that output_dir already holds (its checkpoint-N/, run.json and adapter files are deleted when training starts).
        seed: random seed of the split, the shuffling and the adapter init.
        report_to: logging backend when wandb is not used: none or tensorboard.
        wandb_project: log to this Weights & Biases project (offline when no login is configured).
        wandb_run_name: W&B run name.
        wandb_watch: W&B watch mode: false, gradients or all.
        wandb_log_model: W&B: upload checkpoints as artifacts ('checkpoint' or 'end').
        trust_remote_code: allow model code from the hub (off by default: it runs foreign code).
    """
    args = bundled.finetune_defaults(dict(locals()))
    base_model, data_path, micro_batch_size, learning_rate, train_on_inputs = (args[k] for k in bundled.DECIDED_FLAGS)
    started = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", 1))

    # Parse and check everything cheap first, so bad input fails before any file is written.
    accumulation = training.accumulation_steps(batch_size, micro_batch_size, world_size)
    if cutoff_len <= 0:
        raise UsageError(f"--cutoff_len must be positive, got {cutoff_len}")
    adapter_options = {k: args[k] for k in training.ADAPTER_FLAGS}
    method = adapters.resolve(adapter_name, adapter_options)[0]
    prompter = Prompter.load(prompt_template_name)
    resume = training.resume_plan(resume_from_checkpoint, output_dir, overwrite)
    warm_config = read_adapter_config(resume.warm_start) if resume.warm_start else None
    if warm_config:  # the method trained is the warm start's own, whatever --adapter_name says
        method = adapters.method_of(warm_config)
    if method == "prefix-tuning" and use_gradient_checkpointing:  # its key/value prefixes are lost in recomputation
        raise UsageError("prefix tuning cannot train with --use_gradient_checkpointing (the recomputed layers drop "
                         "its key/value prefixes); pass --use_gradient_checkpointing False, or use another method")
    check_quantization(load_8bit, load_4bit)
    base_config = load_config(base_model, trust_remote_code)
    skeleton = load_skeleton(base_config, trust_remote_code)
    if not resume.warm_start:  # (a warm start takes its adapter's own settings)
        # Built on the skeleton, the adapter refuses in a second what it would refuse on the loaded model: targets
        # that match nothing, a serial adapter with no placement, SIBO with no site.
        with torch.device("meta"):
            skeleton = adapters.build(skeleton, adapter_name, adapter_options)
        peft_config = skeleton.peft_config["default"]
        if resume.checkpoint:  # its adapter must be the one these flags make
            training.check_resumable(resume.checkpoint, peft_config, base_model)
    train_data = load_data(data_path)
    data_file = training_file(data_path)  # (None for a hub id)
    settings = {**args, "data_sha256": file_sha256(data_file) if data_file else None}  # what a resumed run must keep
    if resume.checkpoint:
        training.check_same_run(resume.checkpoint, settings)
    training.check_schedule(num_epochs, max_steps, learning_rate, warmup_steps, eval_step, save_step,
                            has_validation=bool(val_set_size))
    report = training.reporting(report_to, wandb_project, wandb_run_name, wandb_watch, wandb_log_model)

    # Load the tokenizer and data, then the model, then wrap it in the adapter.
    tokenizer = load_tokenizer(base_model, trust_remote_code)
    if tokenizer.eos_token_id is None:  # appended to every example, it is how a model learns to stop
        raise UsageError(f"the tokenizer of {base_model!r} has no EOS token, so the model would never learn to stop; "
                         "name one as \"eos_token\" in its tokenizer_config.json")
    train_set, val_set = training_sets(train_data, val_set_size, seed, tokenizer, prompter, cutoff_len, train_on_inputs)
    if len(train_set) == 0:
        raise UsageError("no training example has a token to learn from; raise --cutoff_len")
    if val_set is not None and len(val_set) == 0:  # the Trainer would fail at its first evaluation, well into the run
        raise UsageError(f"no validation example has a response token within --cutoff_len {cutoff_len}; raise "
                         "--cutoff_len, or hold out more records with --val_set_size (0 for none)")
    longest = max(len(ids) for part in (train_set, val_set) if part is not None for ids in part["input_ids"])
    adapter_config = warm_config or peft_config.to_dict()
    check_position_limit(skeleton, base_model, longest, adapter_config.get("num_virtual_tokens") or 0)
    model = load_base_model(base_model, load_8bit, load_4bit, trust_remote_code=trust_remote_code)
    adopt_pad_token(model, tokenizer)
    model = training.prepare_base(model, quantized=load_8bit or load_4bit, checkpointing=use_gradient_checkpointing)
    transformers.set_seed(seed)  # the adapter's random init is part of what a seed reproduces
    if resume.warm_start:
        model = training.warm_start(model, resume.warm_start)
    else:
        model = adapters.build(model, adapter_name, adapter_options)
    trainable, total = parameter_counts(model)
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")

    # Train with the HF Trainer; resumable checkpoint-N/ folders land in output_dir.
    trainer = training.make_trainer(
        model, tokenizer, train_set, val_set,
        output_dir=output_dir, micro_batch_size=micro_batch_size, accumulation=accumulation,
        num_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate,
        warmup_steps=warmup_steps, eval_step=eval_step, save_step=save_step,
        save_total_limit=save_total_limit, group_by_length=group_by_length, packing=packing,
        checkpointing=use_gradient_checkpointing, seed=seed, report=report, resume_dir=resume.checkpoint, started=started,
    )
    trainer.add_callback(training.RunSettings(settings))
    if resume.checkpoint and (step := training.resumed_at_the_end(trainer, resume.checkpoint, output_dir)):
        if trainer.is_world_process_zero():
            print(f"{output_dir} holds a finished run at step {step}, all the steps these flags plan: nothing to "
                  "train (a larger --max_steps or --num_epochs continues it)")
        end_process_group()
        return
    if trainer.is_world_process_zero():  # now that every check has passed
        training.discard(resume, output_dir)
    result = trainer.train(resume_from_checkpoint=resume.checkpoint)

    # Save the adapter, tokenizer, template and run record, each file written atomically.
    if trainer.is_world_process_zero():
        record = training.run_record(args, trainer, result, trainable, total, len(train_set), method)
        training.save_final(model, tokenizer, prompter, record, output_dir)
        which = (f" of step {record['adapter_step']}, the lowest validation loss ({record['adapter_val_loss']:.4f}) of the "
                 "saved checkpoints," if record["adapter_val_loss"] is not None else "")
        print(f"saved the {method} adapter{which} to {output_dir}")
    end_process_group()  # under torchrun, after rank 0's save


if __name__ == "__main__":
    run_cli(train, interrupted="the checkpoint-N folders saved so far are kept; "
                               "continue with --resume_from_checkpoint latest")
