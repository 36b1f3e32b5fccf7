"""The one table of adapter methods: `--adapter_name` -> a peft config, and the model built from it.

A method is a row of METHODS: a function from the script's adapter options (a dict holding every
adapter flag of finetune.py) and the base model's `model_type` to a peft config. An alias is a row of
ALIASES: another name for a method with some options preset. Adding a method never touches a script.
SIBO (`--embedding_lambda`, `--ffn`) boosts any method that supports it (`peft_ext.sibo`).
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from transformers.pytorch_utils import Conv1D

from peft_ext import sibo
from peft_ext.errors import UsageError
from peft_ext.tuners.bottleneck import BottleneckConfig  # importing the tuners registers our methods with peft


@dataclass(frozen=True)
class Method:
    make_config: Callable[[dict, str], PeftConfig]  # (adapter options, model_type) -> peft config
    summary: str


@dataclass(frozen=True)
class Alias:
    method: str
    # options the alias implies, over the user's flags; a callable maps the user's value to the alias's
    preset: dict = field(default_factory=dict)


# LoRA's default targets per model family: the attention projections, as in the LLM-Adapters paper.
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def parse_list(value) -> list[str] | None:
    """`'[q_proj,v_proj]'`, `'q_proj,v_proj'`, `["q_proj", "v_proj"]` or a tuple -> a list of names."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.strip().strip("[]()").split(",")
    names = [str(v).strip().strip("'\" ") for v in value]
    return [n for n in names if n] or None


def default_targets(table: dict, model_type: str, method: str) -> list[str]:
    if model_type not in table:
        raise UsageError(
            f"{method} has no default target modules for model type {model_type!r}; "
            "pass --target_modules (e.g. '[q_proj,v_proj]')"
        )
    return list(table[model_type])


def _lora(options: dict, model_type: str, use_dora: bool = False) -> PeftConfig:
    return LoraConfig(
        r=options["lora_r"],
        lora_alpha=options["lora_alpha"],
        lora_dropout=options["lora_dropout"],
        target_modules=parse_list(options.get("target_modules"))
        or default_targets(LORA_TARGETS, model_type, "LoRA"),
        bias="none",
        use_dora=use_dora,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores its weight transposed
        task_type="CAUSAL_LM",
    )


def _ia3(options: dict, model_type: str) -> PeftConfig:
    targets = parse_list(options.get("target_modules")) or default_targets(
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, model_type, "(IA)3"
    )
    # (IA)3 scales the input of feed-forward output layers and the output of the others.
    feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    ff_names = {f.split(".")[-1] for f in feedforward}
    return IA3Config(
        target_modules=targets,
        feedforward_modules=[t for t in targets if t.split(".")[-1] in ff_names],
        fan_in_fan_out=model_type == "gpt2",  # as for LoRA; peft would otherwise set it itself, with a warning
        task_type="CAUSAL_LM",
    )


# The bottleneck flags of finetune.py, named as BottleneckConfig's fields; absent ones take its defaults.
BOTTLENECK_OPTIONS = (
    "bottleneck_size", "non_linearity", "adapter_dropout", "use_parallel_adapter", "use_adapterp", "scaling",
    "init_weights",
)


def _bottleneck(options: dict, model_type: str) -> PeftConfig:
    settings = {k: options[k] for k in BOTTLENECK_OPTIONS if options.get(k) is not None}
    return BottleneckConfig(
        **settings, target_modules=parse_list(options.get("target_modules")), task_type="CAUSAL_LM"
    )


def _scaled(scaling):
    """Scaled Parallel's scale: the user's, or 4.0 (He et al.) when the flag is left at 1."""
    try:
        left_at_one = scaling is None or float(scaling) == 1.0
    except ValueError:  # "learned"
        left_at_one = False
    return 4.0 if left_at_one else scaling


def _prefix(options: dict, model_type: str) -> PeftConfig:
    return PrefixTuningConfig(num_virtual_tokens=options["num_virtual_tokens"], task_type="CAUSAL_LM")


def _p_tuning(options: dict, model_type: str) -> PeftConfig:
    return PromptEncoderConfig(num_virtual_tokens=options["num_virtual_tokens"], task_type="CAUSAL_LM")


def _prompt_tuning(options: dict, model_type: str) -> PeftConfig:
    return PromptTuningConfig(num_virtual_tokens=options["num_virtual_tokens"], task_type="CAUSAL_LM")


METHODS: dict[str, Method] = {
    "lora": Method(_lora, "LoRA: low-rank update B·A of the target weights (peft)"),
    "dora": Method(lambda o, t: _lora(o, t, use_dora=True), "DoRA: LoRA with a learned magnitude (peft)"),
    "ia3": Method(_ia3, "(IA)3: learned rescaling of activations (peft)"),
    "prefix-tuning": Method(_prefix, "prefix tuning: trained key/value prefixes in every layer (peft)"),
    "p-tuning": Method(_p_tuning, "p-tuning: virtual tokens from a prompt encoder (peft)"),
    "prompt-tuning": Method(_prompt_tuning, "prompt tuning: trained virtual input tokens (peft)"),
    "bottleneck": Method(
        _bottleneck, "bottleneck adapters: AdapterH/AdapterP (serial) or Parallel (peft_ext.tuners.bottleneck)"
    ),
}
ALIASES: dict[str, Alias] = {
    "prefix": Alias("prefix-tuning"),
    "ptuning": Alias("p-tuning"),
    "adapterh": Alias("bottleneck"),
    "adapterp": Alias("bottleneck", {"use_adapterp": True}),
    "parallel": Alias("bottleneck", {"use_parallel_adapter": True}),
    "scaled-parallel": Alias("bottleneck", {"use_parallel_adapter": True, "scaling": _scaled}),
}


# Each method's peft_type in adapter_config.json (LoRA's also says whether it is DoRA).
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix-tuning", "P_TUNING": "p-tuning",
              "PROMPT_TUNING": "prompt-tuning", "BOTTLENECK": "bottleneck"}


def method_of(adapter_config: dict) -> str:
    """The method an adapter_config.json describes (what a warm start trains, whatever --adapter_name says)."""
    name = PEFT_TYPES.get(str(adapter_config.get("peft_type")), str(adapter_config.get("peft_type")).lower())
    return "dora" if name == "lora" and adapter_config.get("use_dora") else name


def normalize(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def resolve(adapter_name: str, options: dict) -> tuple[str, dict]:
    """The canonical method name and the options with an alias's presets applied."""
    name = normalize(adapter_name)
    alias = ALIASES.get(name) or ALIASES.get(name.replace("-", ""))
    if alias:
        preset = {k: v(options.get(k)) if callable(v) else v for k, v in alias.preset.items()}
        name, options = alias.method, {**options, **preset}
    elif name not in METHODS:
        known = sorted(METHODS) + sorted(ALIASES)
        raise UsageError(f"unknown --adapter_name {adapter_name!r}; choose one of {', '.join(known)}")
    check_sizes(name, options)
    for flag, alias in BOTTLENECK_SWITCHES.items():
        if name != "bottleneck" and options.get(flag):
            raise UsageError(f"--{flag} sets up bottleneck adapters, which {name} is not; pass --adapter_name {alias}, "
                             f"or leave --{flag} out")
    return name, options


# The switches only bottleneck adapters read (another method would train without them, silently), and the alias
# that sets each.
BOTTLENECK_SWITCHES = {"use_parallel_adapter": "parallel", "use_adapterp": "adapterp"}


# The sizes each method reads: (flag, whole number, lowest allowed, highest allowed or None); checked before any
# model loads, where peft would refuse some only once it builds the adapter, and take a size of 0 silently.
SIZES = {
    "lora": [("lora_r", True, 1, None), ("lora_alpha", True, 1, None), ("lora_dropout", False, 0, 1)],
    "prefix-tuning": [("num_virtual_tokens", True, 1, None)],
    "p-tuning": [("num_virtual_tokens", True, 1, None)],
    "prompt-tuning": [("num_virtual_tokens", True, 1, None)],
    "bottleneck": [("adapter_dropout", False, 0, 1)],
}
SIZES["dora"] = SIZES["lora"]


def check_sizes(method: str, options: dict) -> None:
    for flag, whole, low, high in SIZES.get(method, []):
        value = options.get(flag)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and (not whole or isinstance(value, int))
        if not number or value < low or (high is not None and value >= high):
            span = f"from {low} up to (not including) {high}" if high is not None else f"at least {low}"
            raise UsageError(f"--{flag} must be {'a whole number ' if whole else 'a number '}{span}, got {value!r}")


def make_config(adapter_name: str, options: dict, model_type: str) -> tuple[str, PeftConfig]:
    name, options = resolve(adapter_name, options)
    config = METHODS[name].make_config(options, model_type)
    return name, sibo.boost(config, name, options.get("embedding_lambda"), options.get("ffn"))


def adaptable_layer_names(model: torch.nn.Module) -> list[str]:
    """The last name component of every layer an adapter can wrap (Linear, GPT-2's Conv1D)."""
    names = {
        full.rsplit(".", 1)[-1]
        for full, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not full.endswith("lm_head")
    }
    return sorted(names)


def check_targets(model: torch.nn.Module, config: PeftConfig) -> None:
    """Fail with the model's layer names when a target module matches nothing."""
    targets = getattr(config, "target_modules", None)
    if not targets or isinstance(targets, str):  # a string is a regex over full names: peft checks it
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UsageError(
            f"--target_modules {missing} match no layer of this {model.config.model_type} model; "
            f"its Linear layers are: {', '.join(adaptable_layer_names(model))}"
        )


def build(model, adapter_name: str, options: dict):
    """Wrap `model` in the adapter that `adapter_name` and `options` describe; returns a PeftModel."""
    name, config = make_config(adapter_name, options, model.config.model_type)
    check_targets(model, config)
    return get_peft_model(model, config)
