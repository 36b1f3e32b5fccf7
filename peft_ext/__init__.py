"""Shared code of the llm-adapters scripts. Importing it registers our own adapter methods with peft:
the bottleneck adapters (`peft_ext.tuners`) and the SIBO booster for LoRA (`peft_ext.sibo`)."""
from peft_ext.errors import UsageError  # noqa: F401
from peft_ext import tuners  # noqa: F401,E402  (first: the bottleneck tuner imports sibo, sibo its layer)
from peft_ext import sibo  # noqa: F401,E402
