"""LLM-Adapters' bottleneck adapters as a peft method: `peft_type` BOTTLENECK, key prefix `adapter_`."""
from peft_ext.tuners import register_method
from peft_ext.tuners.bottleneck.config import BottleneckConfig
from peft_ext.tuners.bottleneck.layer import BottleneckLayer, Linear
from peft_ext.tuners.bottleneck.model import BottleneckModel

__all__ = ["BottleneckConfig", "BottleneckLayer", "BottleneckModel", "Linear"]

register_method("bottleneck", BottleneckConfig, BottleneckModel)
