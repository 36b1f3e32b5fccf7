"""BottleneckConfig: the LLM-Adapters bottleneck adapters (AdapterH, AdapterP, Parallel) as a peft config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType
from transformers.activations import ACT2FN

from peft_ext.errors import UsageError

MH_ADAPTER = "mh_adapter"  # y = W(x + A(x)): the adapter before the layer
OUTPUT_ADAPTER = "output_adapter"  # h = W(x); y = h + A(h): the adapter after the layer
PARALLEL_ADAPTER = "parallel_adapter"  # y = W(x) + A(x)
SERIAL_PLACEMENTS = (MH_ADAPTER, OUTPUT_ADAPTER)

# The serial placement of each MLP projection, per model family: the MLP's input projection(s) take the
# adapter before W, its output projection after W. Names are suffixes of module names; GPT-2 needs the
# `mlp.` part because its attention also has a `c_proj`.
PLACEMENTS = {
    "llama": {"gate_proj": MH_ADAPTER, "up_proj": MH_ADAPTER, "down_proj": OUTPUT_ADAPTER},
    "mistral": {"gate_proj": MH_ADAPTER, "up_proj": MH_ADAPTER, "down_proj": OUTPUT_ADAPTER},
    "qwen2": {"gate_proj": MH_ADAPTER, "up_proj": MH_ADAPTER, "down_proj": OUTPUT_ADAPTER},
    "bloom": {"dense_h_to_4h": MH_ADAPTER, "dense_4h_to_h": OUTPUT_ADAPTER},
    "gptj": {"fc_in": MH_ADAPTER, "fc_out": OUTPUT_ADAPTER},
    "gpt_neo": {"c_fc": MH_ADAPTER, "c_proj": OUTPUT_ADAPTER},
    "gpt_neox": {"dense_h_to_4h": MH_ADAPTER, "dense_4h_to_h": OUTPUT_ADAPTER},
    "opt": {"fc1": MH_ADAPTER, "fc2": OUTPUT_ADAPTER},
    "gpt2": {"mlp.c_fc": MH_ADAPTER, "mlp.c_proj": OUTPUT_ADAPTER},
}

# Default targets. AdapterH: every MLP projection; AdapterP: the MLP output projection only;
# Parallel: the attention input projections (the reference's defaults, extended to our families).
ADAPTERH_TARGETS = {model_type: list(roles) for model_type, roles in PLACEMENTS.items()}
ADAPTERP_TARGETS = {
    model_type: [name for name, placement in roles.items() if placement == OUTPUT_ADAPTER]
    for model_type, roles in PLACEMENTS.items()
}
PARALLEL_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "k_proj", "v_proj"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

INIT_WEIGHTS = ("bert", "mam_adapter")
BIAS = ("none", "all", "adapter_only")


def matches(key: str, name: str) -> bool:
    """Whether the module called `key` is the module `name` (a name suffix on a `.` boundary)."""
    return key == name or key.endswith("." + name)


@dataclass
class BottleneckConfig(PeftConfig):
    """
    Configuration of a [`BottleneckModel`]: bottleneck adapters `A(v) = s · up(act(down(drop(v))))` wrapped
    around target Linear layers (LLM-Adapters' AdapterH, AdapterP, Parallel and Scaled Parallel).

    Args:
        bottleneck_size (`int`): The adapter's inner width b (down: d → b, up: b → d').
        non_linearity (`str`): The activation between down and up, a name of `transformers.activations.ACT2FN`.
        adapter_dropout (`float`): Dropout on the adapter's input.
        target_modules (`Optional[Union[list[str], str]]`): The layers to adapt: names (suffix match) or a
            regex over full names. By default, the family's table for AdapterH, AdapterP (`use_adapterp`) or
            Parallel (`use_parallel_adapter`).
        exclude_modules (`Optional[Union[list[str], str]]`): Layers never to adapt.
        use_parallel_adapter (`bool`): Every target gets a parallel adapter, `y = W(x) + A(x)`.
        use_adapterp (`bool`): Default targets are the MLP output projection only (AdapterP). No effect when
            `target_modules` is given.
        scaling (`Union[float, str]`): The scale s: a number, or `"learned"` (one trainable scalar from 1).
        bias (`str`): Which biases train as well: `none`, `all` or `adapter_only` (those of the adapted layers).
        init_weights (`str`): `bert`: down and up ~ N(0, 0.02); `mam_adapter`: down Kaiming-uniform (a=√5),
            up zero, so the adapter starts as the identity.
        placements (`Optional[dict[str, str]]`): Serial placement per module name: `mh_adapter` (before W) or
            `output_adapter` (after W). By default the family's table; recorded so a checkpoint is
            self-describing.
        modules_to_save (`Optional[list[str]]`): Other modules to train and save in full.
        embedding_lambda (`float`): SIBO's λ: boosted adapter inputs become (1 − λ)·z + λ·E (see
            `peft_ext.sibo`). 0 switches SIBO off.
        ffn (`Optional[bool]`): SIBO's switch for injecting at the feed-forward sites (see `peft_ext.sibo`).
    """

    bottleneck_size: int = field(default=256, metadata={"help": "Inner width of the bottleneck adapter"})
    non_linearity: str = field(default="tanh", metadata={"help": "Activation between down and up projection"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffixes) or a regex of the layers to adapt"}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffixes) or a regex of layers not to adapt"}
    )
    use_parallel_adapter: bool = field(default=False, metadata={"help": "Parallel adapters on every target"})
    use_adapterp: bool = field(default=False, metadata={"help": "Default targets: MLP output projection only"})
    scaling: Union[float, str] = field(default=1.0, metadata={"help": "Adapter scale: a number or 'learned'"})
    bias: Literal["none", "all", "adapter_only"] = field(default="none", metadata={"help": "Biases to train"})
    init_weights: Literal["bert", "mam_adapter"] = field(
        default="bert", metadata={"help": "'bert': N(0, 0.02); 'mam_adapter': Kaiming down, zero up"}
    )
    placements: Optional[dict[str, str]] = field(
        default=None, metadata={"help": "Module name -> 'mh_adapter' or 'output_adapter' (serial adapters)"}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save in full"}
    )
    embedding_lambda: float = field(default=0.0, metadata={"help": "SIBO's lambda (0: SIBO off)"})
    ffn: Optional[bool] = field(default=None, metadata={"help": "SIBO: inject at the feed-forward sites"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.scaling = _parse_scaling(self.scaling)
        if int(self.bottleneck_size) != self.bottleneck_size or self.bottleneck_size < 1:
            raise UsageError(f"--bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        self.bottleneck_size = int(self.bottleneck_size)
        if self.non_linearity not in ACT2FN:
            raise UsageError(
                f"unknown --non_linearity {self.non_linearity!r}; choose one of {', '.join(sorted(ACT2FN))}"
            )
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise UsageError(f"--adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if self.init_weights not in INIT_WEIGHTS:
            raise UsageError(f"unknown init_weights {self.init_weights!r}; choose one of {', '.join(INIT_WEIGHTS)}")
        if self.bias not in BIAS:
            raise UsageError(f"unknown bias {self.bias!r}; choose one of {', '.join(BIAS)}")
        if self.use_parallel_adapter and self.use_adapterp:
            raise UsageError("--use_parallel_adapter and --use_adapterp exclude each other; pick one")
        for name, placement in (self.placements or {}).items():
            if placement not in SERIAL_PLACEMENTS:
                raise UsageError(
                    f"placement of {name!r} is {placement!r}; choose one of {', '.join(SERIAL_PLACEMENTS)}"
                )

    def placement_of(self, key: str, model_type: str) -> str:
        """Where the adapter of the module called `key` goes: mh_adapter, output_adapter or parallel_adapter."""
        if self.use_parallel_adapter:
            return PARALLEL_ADAPTER
        for name, placement in (self.placements or {}).items():
            if matches(key, name):
                return placement
        known = ", ".join(f"{n} ({p})" for n, p in (self.placements or {}).items()) or "none"
        raise UsageError(
            f"no serial bottleneck placement for {key!r} in this {model_type} model (known: {known}); "
            "target those modules, or pass --use_parallel_adapter to put parallel adapters anywhere"
        )


def _parse_scaling(scaling) -> Union[float, str]:
    """`"learned"`, or the scale as a float (the reference crashed on an int such as `--scaling 2`)."""
    if isinstance(scaling, str) and scaling.strip().lower() == "learned":
        return "learned"
    if isinstance(scaling, bool):
        raise UsageError(f"--scaling must be a number or 'learned', got {scaling!r}")
    try:
        return float(scaling)
    except (TypeError, ValueError):
        raise UsageError(f"--scaling must be a number or 'learned', got {scaling!r}") from None
