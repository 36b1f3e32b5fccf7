"""The bottleneck adapter layer: a wrapped Linear (or GPT-2 Conv1D, or bitsandbytes 8/4-bit Linear)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from peft_ext.errors import UsageError
from peft_ext.tuners.bottleneck.config import MH_ADAPTER, OUTPUT_ADAPTER, PARALLEL_ADAPTER, BottleneckConfig


class BottleneckLayer(BaseTunerLayer):
    """Adapters `A(v) = s · up(act(down(drop(v))))`, one per adapter name, around a frozen base layer."""

    # the names of the layers holding trainable adapter weights
    adapter_layer_names = ("adapter_down", "adapter_up", "adapter_scaling")
    # the other per-adapter state
    other_param_names = ("placement", "scaling", "adapter_dropout", "adapter_act")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.placement: dict[str, str] = {}
        self.scaling: dict[str, float] = {}  # fixed scales; learned ones live in adapter_scaling
        self.adapter_down = nn.ModuleDict({})
        self.adapter_up = nn.ModuleDict({})
        self.adapter_scaling = nn.ParameterDict({})
        self.adapter_dropout = nn.ModuleDict({})
        self.adapter_act = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, Conv1D):  # GPT-2: the weight is stored transposed, (in, out)
            self.in_features, self.out_features = base.weight.shape
        elif isinstance(base, nn.Linear):  # includes bitsandbytes' Linear8bitLt and Linear4bit
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise UsageError(
                f"bottleneck adapters wrap Linear layers (also GPT-2's Conv1D and bitsandbytes 8/4-bit), "
                f"not {type(base).__name__}"
            )

    def update_layer(self, adapter_name: str, config: BottleneckConfig, placement: str) -> None:
        """Add the adapter `adapter_name` with `config`'s settings at `placement`."""
        d_in, d_out = {
            MH_ADAPTER: (self.in_features, self.in_features),
            OUTPUT_ADAPTER: (self.out_features, self.out_features),
            PARALLEL_ADAPTER: (self.in_features, self.out_features),
        }[placement]
        self.placement[adapter_name] = placement
        self.adapter_down[adapter_name] = nn.Linear(d_in, config.bottleneck_size, bias=False)
        self.adapter_up[adapter_name] = nn.Linear(config.bottleneck_size, d_out, bias=False)
        self.adapter_act[adapter_name] = ACT2FN[config.non_linearity]
        self.adapter_dropout[adapter_name] = (
            nn.Dropout(p=config.adapter_dropout) if config.adapter_dropout > 0 else nn.Identity()
        )
        if config.scaling == "learned":
            self.adapter_scaling[adapter_name] = nn.Parameter(torch.ones(1))
        else:
            self.scaling[adapter_name] = config.scaling
        self.reset_adapter_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_adapter_parameters(self, adapter_name: str, init_weights: str) -> None:
        down = self.adapter_down[adapter_name].weight
        up = self.adapter_up[adapter_name].weight
        if init_weights == "mam_adapter":  # the adapter starts as the identity
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            nn.init.zeros_(up)
        else:  # "bert"
            nn.init.normal_(down, mean=0.0, std=0.02)
            nn.init.normal_(up, mean=0.0, std=0.02)

    def scaled_adapter(self, adapter_name: str, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`s · A(v)` computed in the adapter's dtype (fp32), returned in `dtype`."""
        down = self.adapter_down[adapter_name]
        v = self._cast_input_dtype(v, down.weight.dtype)
        out = self.adapter_up[adapter_name](self.adapter_act[adapter_name](down(self.adapter_dropout[adapter_name](v))))
        if adapter_name in self.adapter_scaling:
            out = out * self.adapter_scaling[adapter_name]
        else:
            out = out * self.scaling[adapter_name]
        return out.to(dtype)


class Linear(nn.Module, BottleneckLayer):
    """A Linear-like layer with bottleneck adapters before, after or beside it."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, placement: str, **kwargs):
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, placement)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise UsageError(
            "bottleneck adapters are nonlinear and cannot be merged into the base weights; "
            "load the adapter with PeftModel.from_pretrained instead"
        )

    def unmerge(self) -> None:
        """Nothing to undo: a bottleneck adapter is never merged."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [name for name in self.active_adapters if name in self.adapter_down]
        if self.disable_adapters or not active:
            return self.base_layer(x, *args, **kwargs)

        # Several active adapters compose: every adapter before W sees the original x, every adapter
        # after W sees the base layer's output h.
        layer_input = x
        for name in active:
            if self.placement[name] == MH_ADAPTER:
                layer_input = layer_input + self.scaled_adapter(name, x, x.dtype)
        h = self.base_layer(layer_input, *args, **kwargs)
        result = h
        for name in active:
            if self.placement[name] == PARALLEL_ADAPTER:
                result = result + self.scaled_adapter(name, x, h.dtype)
            elif self.placement[name] == OUTPUT_ADAPTER:
                result = result + self.scaled_adapter(name, h, h.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
