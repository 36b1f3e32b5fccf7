"""Merge a trained adapter into its LLaMA base model and save it in Meta's original layout.

    python export_state_dict_checkpoint.py --lora_weights ./trained_models/llama-lora --output_dir ./ckpt

The output folder holds consolidated.00.pth (Meta's parameter names, wq/wk in Meta's rotary order, the
base model's dtype; read it with `torch.load(path, weights_only=True)`), params.json from the model's
config, and the tokenizer. Only LLaMA bases without biases or rotary scaling fit that layout; other
models, and adapters that cannot be merged, are refused with the reason. The folder appears only once
complete.
"""
if __name__ == "__main__":  # first, and only when run: Ctrl-C while the libraries load ends in one line
    import peft_ext.quiet_start  # noqa: F401

import json
import os

import torch

from peft_ext import export
from peft_ext.errors import run_cli


def main(
    base_model: str = "",
    lora_weights: str = "",
    weights_path: str = "",
    output_dir: str = "./ckpt",
    overwrite: bool = False,
):
    """Merge the adapter in --lora_weights into its LLaMA base model and save it to --output_dir in Meta's layout.

    Args:
        base_model: LLaMA base model directory or hub id (default: $BASE_MODEL, else the checkpoint's run.json / adapter_config.json).
        lora_weights: the adapter checkpoint directory to merge (finetune.py's output_dir).
        weights_path: the seed's other name for --lora_weights.
        output_dir: the folder to write; it appears only once complete.
        overwrite: replace a non-empty --output_dir.
    """
    # parse and check (LLaMA layout only), then load, merge and rename
    checkpoint, merged, tokenizer = export.prepare(
        base_model, lora_weights, weights_path, output_dir, overwrite, extra_check=export.check_meta_llama
    )
    state_dict = export.meta_state_dict(merged)

    # save
    with export.staged_output(output_dir) as staging:
        torch.save(state_dict, os.path.join(staging, "consolidated.00.pth"))
        with open(os.path.join(staging, "params.json"), "w") as f:
            json.dump(export.meta_params(merged.config), f, indent=2)
        tokenizer.save_pretrained(staging)
    print(f"merged {checkpoint.adapter_dir} into {checkpoint.base_model}, in Meta's layout: {output_dir}")


if __name__ == "__main__":
    run_cli(main, interrupted="nothing was exported; --output_dir is as it was")
