"""SIBO (arXiv 2402.11896): the initial-residual booster, for LoRA and bottleneck adapters.

A boosted adapter branch sees `(1 − λ)·z + λ·E` instead of its input `z`, where `E` is the raw token-embedding
lookup of the current tokens (before any norm, dropout or position embedding; the same `E` in every layer) and
`λ = embedding_lambda`. The frozen path is unchanged. The sites, as in the reference:

| adapter | site |
|---|---|
| LoRA | the LoRA branch of the MLP input projection: llama/mistral/qwen2 `up_proj`, gptj `fc_in`, bloom and gpt_neox `dense_h_to_4h`, opt `fc1`, gpt2/gpt_neo `mlp.c_fc` (must be a LoRA target) |
| bottleneck | the adapters before W (`mh_adapter`; llama: `gate_proj`, `up_proj`), inside the adapter: `W(z + s·A(mix(z)))` |
| bottleneck, gptj/bloom | the whole MLP input, `MLP((1 − λ)·z + λ·E)`: the frozen layers and all adapters inside see the mix |

A site that is not there is reported: an error when an adapter has none at all (e.g. LoRA without `up_proj`,
AdapterP, parallel adapters outside gptj/bloom), a warning when some of the family's before-W bottleneck
sites carry no adapter. The mix is per position, so under `generate()` with a KV cache each step mixes in the
embeddings of its new tokens only. `E` is captured by a hook on the input embedding layer at every forward
pass (or taken from `inputs_embeds`), so gradient checkpointing's recomputation and DDP see the `E` of the
pass being differentiated; a boosted model cannot mix adapters per batch row (`adapter_names=`), and two
forward passes before one backward under gradient checkpointing would recompute with the later pass's `E`.

Settings. `embedding_lambda` (0 = SIBO off) and `ffn` are fields of the adapter's config, so they are saved in
`adapter_config.json` and `PeftModel.from_pretrained` restores the boost after `import peft_ext.tuners`; evaluation
and generation need no flag. `ffn` defaults to None, which means True: with `embedding_lambda > 0` the
sites above are boosted, as in all of SIBO's scripts (`--ffn True` is their default); `ffn=False` is the
reference's ablation and injects nothing, at training and at evaluation alike (the reference still injected
at evaluation), with a warning that λ has no effect. The saved config records `ffn` as True or False.

How it plugs into peft: bottleneck adapters carry the two fields themselves. For LoRA, importing this module
makes peft build and load LoRA through `SiboLoraConfig` and `SiboLoraModel`, subclasses of LoraConfig and
LoraModel that only add the two fields and the hooks; a LoRA adapter without SIBO saves the exact config that
plain peft writes. A boosted adapter cannot be merged into the base weights (its branch input depends on E).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Optional

import torch
from peft import LoraConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import PeftType

from peft_ext.errors import UsageError
from peft_ext.tuners.boosted import BoostedTuner
from peft_ext.tuners.bottleneck.config import MH_ADAPTER, PLACEMENTS, BottleneckConfig, matches
from peft_ext.tuners.bottleneck.layer import BottleneckLayer

# LoRA: the MLP input projection whose LoRA branch is boosted, per family.
LORA_SITES = {
    "llama": "up_proj",
    "mistral": "up_proj",
    "qwen2": "up_proj",
    "gptj": "fc_in",
    "bloom": "dense_h_to_4h",
    "gpt_neox": "dense_h_to_4h",
    "opt": "fc1",
    "gpt2": "mlp.c_fc",
    "gpt_neo": "mlp.c_fc",
}
# Bottleneck adapters on these families: the reference mixes the whole MLP input.
MLP_INPUT_FAMILIES = ("gptj", "bloom")


def is_boosted(config) -> bool:
    return getattr(config, "embedding_lambda", 0.0) > 0 and getattr(config, "ffn", None) is not False


def boost(config, method: str, embedding_lambda, ffn):
    """`config` with SIBO's settings recorded (a SiboLoraConfig for LoRA); unchanged when λ is 0."""
    lam = _parse_lambda(embedding_lambda)
    if lam == 0.0:
        return config
    ffn = True if ffn is None else _parse_bool(ffn, "--ffn")
    if not ffn:
        warnings.warn(
            f"SIBO: --ffn False injects nothing (the reference's ablation); --embedding_lambda {lam} has no effect",
            stacklevel=2,
        )
    if isinstance(config, BottleneckConfig):
        config.embedding_lambda, config.ffn = lam, ffn
        return config
    if isinstance(config, LoraConfig) and not config.use_dora:
        values = {f.name: getattr(config, f.name) for f in fields(LoraConfig) if f.init}
        return SiboLoraConfig(**values, embedding_lambda=lam, ffn=ffn)
    raise UsageError(f"--embedding_lambda (SIBO) boosts lora and bottleneck adapters, not {method}")


def _parse_lambda(value) -> float:
    try:
        lam = float(value or 0.0)
    except (TypeError, ValueError):
        raise UsageError(f"--embedding_lambda must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= lam <= 1.0:
        raise UsageError(f"--embedding_lambda must be in [0, 1], got {lam}")
    return lam


def _parse_bool(value, flag: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UsageError(f"{flag} must be True or False, got {value!r}")


class _Booster:
    """The initial embeddings E of a model's current forward pass, and the SIBO hooks that read them."""

    def __init__(self, model: torch.nn.Module):
        self.embeddings: Optional[torch.Tensor] = None
        self.site_hooks: dict[str, list] = {}  # adapter name -> hook handles
        self.capture_hooks = [
            model.base_model.register_forward_pre_hook(self._start_pass, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(self._capture),
        ]

    def _start_pass(self, module, args, kwargs):
        # A pass fed with inputs_embeds never calls the embedding layer: those are its E.
        self.embeddings = kwargs.get("inputs_embeds")

    def _capture(self, module, args, output):
        self.embeddings = output

    def mix(self, lam: float, z: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        if e is None:
            raise RuntimeError("SIBO: no token embeddings were computed in this forward pass; pass input_ids")
        if e.shape[:-1] != z.shape[:-1] and e.numel() == z.numel():
            e = e.reshape(z.shape)  # OPT flattens (batch, position) before its MLP
        elif e.shape[:-1] != z.shape[:-1]:
            raise RuntimeError(
                f"SIBO: the token embeddings of this pass have shape {tuple(e.shape)} but a boosted input has "
                f"{tuple(z.shape)} (mixing adapters per batch row is not supported with SIBO)"
            )
        return (1 - lam) * z + lam * e.to(z.dtype)


def _mix_branch_input(booster: _Booster, lam: float, module, args, kwargs):
    return (booster.mix(lam, args[0]), *args[1:]), kwargs


def _mix_mlp_input(probe: BottleneckLayer, adapter_name: str, booster: _Booster, lam: float, module, args, kwargs):
    if probe.disable_adapters or adapter_name not in probe.active_adapters:
        return None  # the frozen MLP sees the mix only while this adapter is on
    if args:
        return _mix_branch_input(booster, lam, module, args, kwargs)
    return args, {**kwargs, "hidden_states": booster.mix(lam, kwargs["hidden_states"])}


def attach(tuner, adapter_name: str) -> None:
    """Install SIBO for `adapter_name` of `tuner` (a peft BaseTuner) if its config boosts it."""
    config = tuner.peft_config[adapter_name]
    detach(tuner.model, adapter_name)
    if not is_boosted(config):
        return
    model = tuner.model
    model_type = getattr(model.config, "model_type", None)
    width = model.get_input_embeddings().embedding_dim
    if isinstance(config, BottleneckConfig) and model_type in MLP_INPUT_FAMILIES:
        _check_width(width, model.config.hidden_size, "the MLP input")
        probe = next(m for m in model.modules() if isinstance(m, BottleneckLayer) and adapter_name in m.adapter_down)
        boosted_inputs = [m for name, m in model.named_modules() if name.endswith(".mlp")]
        mix = partial(_mix_mlp_input, probe, adapter_name)
    else:
        sites = _branch_sites(model, model_type, config, adapter_name)
        for key, _, in_features in sites:
            _check_width(width, in_features, key)
        boosted_inputs = [branch_input for _, branch_input, _ in sites]
        mix = _mix_branch_input

    booster = getattr(model, "_sibo_booster", None) or _Booster(model)
    model._sibo_booster = booster
    hook = partial(mix, booster, config.embedding_lambda)
    booster.site_hooks[adapter_name] = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in boosted_inputs]


def _check_width(embedding_dim: int, site_width: int, site: str) -> None:
    if embedding_dim != site_width:
        raise UsageError(
            f"SIBO cannot mix token embeddings of width {embedding_dim} into {site} of width {site_width}"
        )


def _branch_sites(model, model_type: str, config, adapter_name: str) -> list:
    """(module name, the module that takes the adapter branch's input, its width) of every boosted branch."""
    if isinstance(config, BottleneckConfig) and config.use_parallel_adapter:  # no adapter sits before W
        before_w = [name for name, placement in PLACEMENTS.get(model_type, {}).items() if placement == MH_ADAPTER]
        serial = f" (its adapters before {', '.join(before_w)} take the mix)" if before_w else ""
        lora = f", or LoRA with {LORA_SITES[model_type]} among its targets" if model_type in LORA_SITES else ""
        raise UsageError(
            f"SIBO boosts parallel adapters on {' and '.join(MLP_INPUT_FAMILIES)} only (it mixes into their whole MLP "
            f"input), not on {model_type}; boost serial adapters instead, --adapter_name adapterh{serial}{lora}; or "
            "pass --embedding_lambda 0"
        )
    if isinstance(config, BottleneckConfig):
        sites = [
            (key, m.adapter_dropout[adapter_name], m.in_features)
            for key, m in model.named_modules()
            if isinstance(m, BottleneckLayer) and m.placement.get(adapter_name) == MH_ADAPTER
        ]
        expected = [name for name, placement in (config.placements or {}).items() if placement == MH_ADAPTER]
        if not sites:
            raise UsageError(
                "SIBO on bottleneck adapters mixes into the adapters before W "
                f"({', '.join(expected) or 'none known for ' + str(model_type)}), and this adapter has none; "
                "target those modules, or pass --embedding_lambda 0"
            )
        missing = [name for name in expected if not any(matches(key, name) for key, _, _ in sites)]
        if missing:
            warnings.warn(f"SIBO: {', '.join(missing)} carry no bottleneck adapter before W; nothing is mixed there")
        return sites

    site = LORA_SITES.get(model_type)
    if site is None:
        raise UsageError(f"SIBO on LoRA knows no site for model type {model_type!r}")
    sites = [
        (key, m.lora_dropout[adapter_name], m.in_features)
        for key, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A and matches(key, site)
    ]
    if not sites:
        targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else config.target_modules
        raise UsageError(
            f"SIBO on LoRA mixes into the LoRA branch of {site}, which is not a LoRA target here "
            f"(targets: {targets}); add {site} to --target_modules"
        )
    return sites


def detach(model, adapter_name: Optional[str] = None) -> None:
    """Remove SIBO's hooks for `adapter_name` (all adapters when None) from `model`."""
    booster = getattr(model, "_sibo_booster", None)
    if booster is None:
        return
    for name in [adapter_name] if adapter_name else list(booster.site_hooks):
        for handle in booster.site_hooks.pop(name, []):
            handle.remove()
    if not booster.site_hooks:
        for handle in booster.capture_hooks:
            handle.remove()
        del model._sibo_booster


@dataclass
class SiboLoraConfig(LoraConfig):
    """LoraConfig with SIBO's settings (see the module docstring)."""

    embedding_lambda: float = field(default=0.0, metadata={"help": "SIBO's lambda (0: SIBO off)"})
    ffn: Optional[bool] = field(default=None, metadata={"help": "SIBO: inject at the feed-forward site"})

    def to_dict(self) -> dict:
        config = super().to_dict()
        if not self.embedding_lambda:  # without SIBO, save exactly what plain peft saves
            del config["embedding_lambda"], config["ffn"]
        return config


class SiboLoraModel(BoostedTuner, LoraModel):
    """LoraModel whose adapters SIBO can boost."""


def _register_lora_booster() -> None:
    """Make peft build and load LoRA adapters through SiboLoraConfig and SiboLoraModel."""
    registered = (PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA], PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA])
    if registered == (SiboLoraConfig, SiboLoraModel):
        return
    if registered != (LoraConfig, LoraModel):
        raise RuntimeError(
            f"peft registers LoRA as {registered}, not (LoraConfig, LoraModel): peft_ext.sibo needs updating "
            "for this peft version"
        )
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] = SiboLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] = SiboLoraModel


_register_lora_booster()
