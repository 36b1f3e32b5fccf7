"""Shared code of the llm-adapters scripts.

Importing the package imports nothing heavy, so small modules such as `peft_ext.files` load in milliseconds.
Our own adapter methods register with peft when `peft_ext.tuners` is imported; the modules that build or load
adapters (`peft_ext.adapters`, `peft_ext.modeling.load_adapter`) import it themselves.
"""
