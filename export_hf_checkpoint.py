"""Merge a trained adapter into its base model and save a plain transformers model.

    python export_hf_checkpoint.py --lora_weights ./trained_models/llama-lora --output_dir ./hf_ckpt
    BASE_MODEL=... python export_hf_checkpoint.py --lora_weights ... --output_dir ./hf_ckpt

LoRA, DoRA and (IA)³ adapters fold into the base weights; bottleneck adapters, prompt methods and
SIBO-boosted adapters cannot, and are refused with the reason. The output folder holds the merged model
(safetensors, in shards of at most --max_shard_size, in the base model's dtype), the tokenizer and the
prompt template: `AutoModelForCausalLM.from_pretrained(output_dir)` loads it without peft, and evaluate.py
and generate.py take it as --base_model. It appears only once complete.
"""
if __name__ == "__main__":  # first, and only when run: Ctrl-C while the libraries load ends in one line
    import peft_ext.quiet_start  # noqa: F401

from peft_ext import export
from peft_ext.errors import run_cli


def main(
    base_model: str = "",
    lora_weights: str = "",
    weights_path: str = "",
    output_dir: str = "./hf_ckpt",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    trust_remote_code: bool = False,
):
    """Merge the adapter in --lora_weights into its base model and save a plain transformers model to --output_dir.

    Args:
        base_model: base model directory or hub id (default: $BASE_MODEL, else the checkpoint's run.json / adapter_config.json).
        lora_weights: the adapter checkpoint directory to merge (finetune.py's output_dir).
        weights_path: the seed's other name for --lora_weights.
        output_dir: the folder to write; it appears only once complete.
        max_shard_size: largest safetensors file, e.g. 5GB or 500MB.
        overwrite: replace a non-empty --output_dir.
        trust_remote_code: allow model code from the hub (off by default: it runs foreign code).
    """
    # parse and check, then load and merge (nothing loads before every check has passed)
    export.check_shard_size(max_shard_size)
    checkpoint, merged, tokenizer = export.prepare(
        base_model, lora_weights, weights_path, output_dir, overwrite, trust_remote_code
    )

    # save
    with export.staged_output(output_dir) as staging:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        checkpoint.prompter.save(staging)
    print(f"merged {checkpoint.adapter_dir} into {checkpoint.base_model}: {output_dir}")


if __name__ == "__main__":
    run_cli(main, interrupted="nothing was exported; --output_dir is as it was")
