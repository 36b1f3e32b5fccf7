"""Loading a base model, its tokenizer and a trained adapter, the same way in every script."""
import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_ext.errors import UsageError

ADAPTER_CONFIG = "adapter_config.json"


def precision() -> str:
    """The training precision this machine supports best: bf16, else fp16 on a GPU, fp32 on a CPU."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def compute_dtype() -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision()]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """--dtype: auto (the machine's compute dtype), float32, bfloat16 or float16 (fp32, bf16, fp16 too)."""
    name = str(name).lower()
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    if name == "auto":
        return compute_dtype()
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_base(base_model: str) -> None:
    if not base_model:
        raise UsageError("--base_model is required: a local model directory or a hub id")
    looks_local = base_model.startswith((".", "/", "~")) or os.path.exists(base_model)
    if looks_local and not os.path.isdir(os.path.expanduser(base_model)):
        raise UsageError(f"base model directory {base_model!r} does not exist; check the --base_model path")


def _from_pretrained(loader, base_model: str, **kwargs):
    """Call a `from_pretrained`, turning 'cannot find it' into a one-line UsageError."""
    _check_base(base_model)
    try:
        return loader.from_pretrained(os.path.expanduser(base_model), **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load {base_model!r}: {first}") from None


def load_tokenizer(base_model: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (many causal LMs ship without one; padding is masked, so any token will do)."""
    tokenizer = _from_pretrained(AutoTokenizer, base_model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token or tokenizer.bos_token
    return tokenizer


def load_config(base_model: str, trust_remote_code: bool = False):
    """The model's config alone (architecture, saved dtype), without loading weights."""
    folder = os.path.expanduser(base_model)
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(f"{base_model!r} holds no config.json: it is not a model folder; give a model folder or hub id "
                         "as --base_model")
    return _from_pretrained(AutoConfig, base_model, trust_remote_code=trust_remote_code)


def load_skeleton(base_config, trust_remote_code: bool = False):
    """The model's modules built on the meta device, with no weights: what checks of its layers read, so that bad
    input fails in a second instead of after minutes of loading a large model."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(base_config, trust_remote_code=trust_remote_code)


# Names of learned position tables: GPT-2, GPT-Neo and StarCoder's wpe, OPT and BioGPT's embed_positions, others'.
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def position_limit(model) -> int | None:
    """How many positions `model` can read, when it looks them up in a table of fixed size: a learned one (less
    its offset: OPT's first 2 rows are never looked up) or GPT-J's and CodeGen's precomputed rotary table; None
    for a model that computes them (RoPE, ALiBi)."""
    sizes = [module.num_embeddings - getattr(module, "offset", 0) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES]
    sizes += [buffer.shape[0] for name, buffer in model.named_buffers() if name.rsplit(".", 1)[-1] == "embed_positions"]
    return min(sizes, default=None)


def check_position_limit(model, base_model: str, longest: int, virtual_tokens: int = 0) -> None:
    """Refuse examples (with the virtual tokens that prompt methods put before them) of more tokens than `model`
    has positions: a lookup past its table fails mid-run."""
    limit = position_limit(model)
    if limit is not None and longest + virtual_tokens > limit:
        virtual = f" and {virtual_tokens} virtual tokens" if virtual_tokens else ""
        raise UsageError(f"an example of {longest} tokens{virtual} is longer than {base_model!r} can read ({limit} "
                         f"positions); lower --cutoff_len to {limit - virtual_tokens}")


def check_quantization(load_8bit: bool, load_4bit: bool) -> None:
    if load_8bit and load_4bit:
        raise UsageError("--load_8bit and --load_4bit exclude each other; pick one")


def quantization_config(load_8bit: bool = False, load_4bit: bool = False,
                        dtype: torch.dtype | None = None) -> BitsAndBytesConfig | None:
    check_quantization(load_8bit, load_4bit)
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if load_4bit:  # QLoRA: NF4 storage, double quantization, matmuls in the compute dtype
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype or compute_dtype(),
        )
    return None


def load_base_model(
    base_model: str,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map=None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """The causal LM, optionally quantized by bitsandbytes, in `dtype` (default: the compute dtype)."""
    quant = quantization_config(load_8bit, load_4bit, dtype)
    if device_map is None and torch.cuda.is_available():
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return _from_pretrained(
        AutoModelForCausalLM,
        base_model,
        dtype=dtype or compute_dtype(),
        quantization_config=quant,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )


def adopt_pad_token(model, tokenizer) -> None:
    """Give a model whose config names no pad token the one `load_tokenizer` chose: the Trainer would align them
    anyway, with a warning on every run."""
    configs = [model.config.get_text_config(), getattr(model, "generation_config", None)]
    for config in configs:
        if config is not None and config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isdir(adapter_dir):
        raise UsageError(f"adapter directory {adapter_dir!r} does not exist; check the path")
    if not os.path.isfile(path):
        raise UsageError(f"{adapter_dir!r} holds no {ADAPTER_CONFIG}: it is not an adapter checkpoint")
    with open(path) as f:
        return json.load(f)


def load_adapter(model, adapter_dir: str, is_trainable: bool = False):
    """Wrap `model` in the adapter saved in `adapter_dir` (any method registered with peft)."""
    from peft import PeftModel

    from peft_ext import tuners  # noqa: F401  registers our methods with peft, so that it can load them

    read_adapter_config(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    except RuntimeError as e:  # shape mismatches: the adapter was trained on another base model
        raise UsageError(f"adapter {adapter_dir!r} does not fit this base model ({mismatch(e)})") from None


def mismatch(error: RuntimeError) -> str:
    """The gist of a state dict that does not fit a model: its first size mismatch, else its first line."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0])[:300]


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)
