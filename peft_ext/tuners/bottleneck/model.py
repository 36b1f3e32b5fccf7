"""BottleneckModel: puts bottleneck adapters on the target layers of a model (peft's BaseTuner)."""
from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner

from peft_ext.errors import UsageError
from peft_ext.tuners.boosted import BoostedTuner
from peft_ext.tuners.bottleneck.config import (
    ADAPTERH_TARGETS,
    ADAPTERP_TARGETS,
    PARALLEL_TARGETS,
    PLACEMENTS,
    BottleneckConfig,
)
from peft_ext.tuners.bottleneck.layer import BottleneckLayer, Linear


class BottleneckModel(BoostedTuner, BaseTuner):
    """
    Creates bottleneck adapters (LLM-Adapters, arXiv 2304.01933) on a pretrained transformers model.

    Args:
        model ([`torch.nn.Module`]): The model to be adapted.
        config ([`BottleneckConfig`]): The configuration of the bottleneck adapters.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.

    Returns:
        `torch.nn.Module`: The model with bottleneck adapters.
    """

    # The reference's key prefix: state-dict keys read `...down_proj.adapter_down.weight` as in its checkpoints.
    prefix: str = "adapter_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = ADAPTERH_TARGETS

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            if peft_config.use_parallel_adapter:
                table = PARALLEL_TARGETS
            elif peft_config.use_adapterp:
                table = ADAPTERP_TARGETS
            else:
                table = ADAPTERH_TARGETS
            if model_type not in table:
                raise UsageError(
                    f"bottleneck adapters have no default target modules for model type {model_type!r}; "
                    "pass --target_modules (e.g. '[up_proj,down_proj]')"
                )
            peft_config.target_modules = set(table[model_type])
        if not peft_config.use_parallel_adapter and peft_config.placements is None:
            peft_config.placements = dict(PLACEMENTS.get(model_type, {}))
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        model_type = getattr(getattr(self.model, "config", None), "model_type", "this")
        placement = peft_config.placement_of(current_key, model_type)
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config, placement)
        else:
            new_module = Linear(target, adapter_name, peft_config, placement)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added adapter trains only once it is set active
            self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise UsageError(
            "bottleneck adapters are nonlinear and cannot be merged into the base weights; "
            "load the adapter with PeftModel.from_pretrained instead"
        )
