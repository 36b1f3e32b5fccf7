"""The export scripts' pieces: which adapters can be merged, merging, Meta's LLaMA layout, and an output
folder that appears whole or not at all."""
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from peft import PeftModel
from peft.config import PromptLearningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from peft_ext import sibo, tuners  # noqa: F401  (tuners: registers our methods with peft)
from peft_ext.checkpoint import Checkpoint, adapter_dir_flag, load_for_inference, resolve_checkpoint
from peft_ext.errors import UsageError
from peft_ext.files import canonical, check_writable, make_readable
from peft_ext.modeling import load_config, read_adapter_config


def prepare(base_model: str, lora_weights: str, weights_path: str, output_dir: str, overwrite: bool,
            trust_remote_code: bool = False, extra_check=None):
    """Refuse what cannot be exported before anything loads; then (checkpoint, merged model, tokenizer).

    The merge runs in fp32 whatever the machine, and the result is cast back to the base's dtype.
    """
    adapter_dir = adapter_dir_flag(lora_weights, weights_path)
    if not adapter_dir:
        raise UsageError("--lora_weights is required: the adapter checkpoint directory to merge")
    checkpoint = resolve_checkpoint(base_model or os.environ.get("BASE_MODEL", ""), adapter_dir)
    if checkpoint.trained_on and canonical(checkpoint.trained_on) != canonical(checkpoint.base_model):
        print(f"note: {adapter_dir} was trained on the base model {checkpoint.trained_on}; merging it into "
              f"{checkpoint.base_model}")
    base_config = load_config(checkpoint.base_model, trust_remote_code)
    check_mergeable(adapter_dir)
    check_output_dir(output_dir, overwrite, checkpoint)
    if extra_check:
        extra_check(base_config)
    model, tokenizer = load_for_inference(checkpoint, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return checkpoint, merge(model, base_config.dtype), tokenizer


def check_shard_size(size) -> None:
    """A --max_shard_size that save_pretrained takes (bytes, or a number and KB/MB/GB/TB), checked before loading."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return
    match = re.fullmatch(r"\s*(\d+(\.\d+)?)\s*[KMGT]B\s*", str(size), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--max_shard_size must be a size such as 5GB or 500MB, got {size!r}")


def check_mergeable(adapter_dir: str) -> None:
    """Refuse, before anything is loaded, an adapter that is not a change of the base weights."""
    config = read_adapter_config(adapter_dir)
    peft_type = config.get("peft_type", "")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if config_class and issubclass(config_class, PromptLearningConfig):
        why = "it feeds trained virtual tokens or key/value prefixes to the model instead of changing its weights"
    elif peft_type == "BOTTLENECK":
        why = "bottleneck adapters are nonlinear modules inside the layers, not a change of their weights"
    elif sibo.is_boosted(SimpleNamespace(**config)):
        why = (f"it uses SIBO (embedding_lambda {config['embedding_lambda']}), whose adapter input mixes in the "
               "token embeddings of each step")
    else:
        return
    raise UsageError(
        f"the {peft_type.lower()} adapter in {adapter_dir!r} cannot be merged into the base model: {why}; "
        f"use it unmerged instead (generate.py or evaluate.py --lora_weights {adapter_dir})"
    )


def check_output_dir(output_dir: str, overwrite: bool, checkpoint: Checkpoint) -> None:
    """Refuse an output folder that holds something (unless --overwrite) or an input (replacing it would
    delete that input)."""
    target = os.path.realpath(output_dir)
    for source in (checkpoint.base_model, checkpoint.adapter_dir):
        if source and os.path.exists(source) and os.path.commonpath([os.path.realpath(source), target]) == target:
            raise UsageError(
                f"--output_dir {output_dir!r} holds {source!r}, an input of this export; choose another folder"
            )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir!r} is a file; choose a folder")
    if os.path.commonpath([os.getcwd(), target]) == target:  # the finished export replaces the folder whole
        raise UsageError(f"--output_dir {output_dir!r} holds the current directory, which an export cannot replace; "
                         "choose another folder")
    check_writable(os.path.dirname(os.path.abspath(output_dir)))  # the export is staged beside it, then moved in
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise UsageError(f"--output_dir {output_dir!r} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staged_output(output_dir: str):
    """A temporary folder beside `output_dir` to write into; it replaces `output_dir` only once the block
    succeeds, so a failed or interrupted export leaves no half-written folder."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        yield staging
        make_readable(staging)
        if os.path.isdir(output_dir):
            replaced = tempfile.mkdtemp(dir=parent, prefix=".replaced-")
            os.replace(output_dir, os.path.join(replaced, "old"))
            os.replace(staging, output_dir)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def merge(model: PeftModel, dtype: torch.dtype | None):
    """The plain transformers model with the adapter folded into its weights, in `dtype` (the base model's
    saved dtype, so that merging in fp32 on a CPU does not double the export's size)."""
    merged = model.merge_and_unload()
    return merged.to(dtype) if dtype else merged


META_ROPE_THETA = 10000.0  # what Meta's code assumes when params.json names none
LAYER_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
# Meta's names for the HF LLaMA weights (transformers' convert_llama_weights_to_hf maps them the other way).
META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
META_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def check_meta_llama(config) -> None:
    """Meta's layout has no place for biases, another head size, activation or rotary scaling."""
    if config.model_type != "llama":
        raise UsageError(
            f"the consolidated state dict is Meta's LLaMA layout, and this base model is {config.model_type!r}; "
            "use export_hf_checkpoint.py"
        )
    rope_type = config.rope_parameters.get("rope_type", "default")
    problems = [
        "attention biases" if config.attention_bias else "",
        "MLP biases" if config.mlp_bias else "",
        f"head_dim {config.head_dim}" if config.head_dim * config.num_attention_heads != config.hidden_size else "",
        f"activation {config.hidden_act}" if config.hidden_act != "silu" else "",
        f"rotary scaling ({rope_type})" if rope_type != "default" else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise UsageError(f"this LLaMA has {', '.join(problems)}, which Meta's layout cannot express; "
                         "use export_hf_checkpoint.py")


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the HF conversion's permutation of wq/wk: HF rotates dimension i of a head with i + head_dim/2,
    Meta with its neighbour (2i with 2i+1)."""
    rows, columns = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of an HF LlamaForCausalLM under Meta's names and in Meta's rotary layout."""
    config = model.config
    state = {}
    for key, tensor in model.state_dict().items():
        name = META_NAMES.get(key) or _meta_layer_name(key)
        if name.endswith("attention.wq.weight"):
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
        state[name] = tensor.contiguous().cpu()  # Meta's loaders expect CPU tensors
    return state


def _meta_layer_name(key: str) -> str:
    match = LAYER_WEIGHT.fullmatch(key)
    if not match or match[2] not in META_LAYER_NAMES:
        raise UsageError(f"weight {key!r} has no place in Meta's LLaMA layout; use export_hf_checkpoint.py")
    return f"layers.{match[1]}.{META_LAYER_NAMES[match[2]]}.weight"


def meta_params(config) -> dict:
    """params.json of Meta's layout, from the model's real config."""
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        **meta_ffn_params(config.hidden_size, config.intermediate_size),
    }
    if config.num_key_value_heads != config.num_attention_heads:
        params["n_kv_heads"] = config.num_key_value_heads
    rope_theta = config.rope_parameters["rope_theta"]
    if rope_theta != META_ROPE_THETA:
        params["rope_theta"] = rope_theta
    return params


def meta_ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float = 1.0) -> int:
    """The MLP width Meta's code derives from params.json (llama/model.py, FeedForward)."""
    width = int(ffn_dim_multiplier * int(8 * dim / 3))
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, width: int) -> dict:
    """multiple_of, and ffn_dim_multiplier where needed, that make Meta's formula give `width`."""
    if meta_ffn_width(dim, 256) == width:  # LLaMA-1 and LLaMA-2 7B/13B
        return {"multiple_of": 256}
    # The half keeps float rounding from landing one below `width`; the rounding up then lands on it.
    return {"multiple_of": math.gcd(width, 256), "ffn_dim_multiplier": (width + 0.5) / int(8 * dim / 3)}
