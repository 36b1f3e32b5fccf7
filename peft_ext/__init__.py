"""Shared code of the llm-adapters scripts. Importing it registers our own adapter methods with peft."""
from peft_ext.errors import UsageError  # noqa: F401
