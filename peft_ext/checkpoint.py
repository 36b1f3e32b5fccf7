"""What an inference script needs from a checkpoint directory: the base model, the tokenizer, the prompt
template, and the model itself, loaded for inference.

A checkpoint directory (finetune.py's output_dir) holds the adapter in peft's format, the tokenizer,
`prompt_template.json` and `run.json` (whose "args" name the base model). A merged model (from
export_hf_checkpoint.py) or any plain model is used as `--base_model` with no adapter.
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import torch

from peft_ext import bundled
from peft_ext.errors import UsageError
from peft_ext.files import INCOMPLETE, canonical
from peft_ext.modeling import (
    ADAPTER_CONFIG,
    load_adapter,
    load_base_model,
    load_config,
    load_tokenizer,
    read_adapter_config,
)
from peft_ext.prompts import TEMPLATE_FILE, Prompter, text_fields

RUN_FILE = "run.json"
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")  # what the Trainer saves during a run: checkpoint-STEP
TOKENIZER_FILE = "tokenizer_config.json"


@dataclass
class Checkpoint:
    base_model: str
    adapter_dir: str | None  # None: the base model alone
    prompter: Prompter
    run_args: dict = field(default_factory=dict)  # the training arguments from run.json
    trained_on: str = ""  # the base model run.json (else adapter_config.json) names, whatever base_model is

    @property
    def tokenizer_dir(self) -> str:
        """The checkpoint's own tokenizer when it saved one (it may add tokens), else the base model's."""
        if self.adapter_dir and os.path.isfile(os.path.join(self.adapter_dir, TOKENIZER_FILE)):
            return self.adapter_dir
        return self.base_model

    @property
    def adapter_label(self) -> str:
        """The adapter's name in evaluate.py's folders and tables: its folder's name, with its run's before it for a
        checkpoint-N/ (every run has a checkpoint-200), or "base" for the base model alone."""
        if not self.adapter_dir:
            return "base"
        folder = os.path.abspath(self.adapter_dir)
        name = os.path.basename(folder)
        return f"{os.path.basename(os.path.dirname(folder))}-{name}" if CHECKPOINT_FOLDER.fullmatch(name) else name

    def identity(self, dtype: torch.dtype) -> dict:
        """What decides the model's outputs, to tell whether saved predictions came from this model."""
        return {
            "base_model": canonical(self.base_model),
            "base_model_files": weights_fingerprint(self.base_model, content=False),
            "lora_weights": canonical(self.adapter_dir) if self.adapter_dir else None,
            "lora_weights_sha256": weights_fingerprint(self.adapter_dir, content=True) if self.adapter_dir else None,
            "prompt_template": text_fields(self.prompter.template),
            "dtype": str(dtype).removeprefix("torch."),
        }


# weights, not a checkpoint-N folder's training state
WEIGHT_FILE = re.compile(r"(?!optimizer|scheduler|rng_state|training_args).*\.(safetensors|bin|pt|pth)$")


def weights_fingerprint(folder: str, content: bool) -> str | None:
    """A short fingerprint of a local folder's weight files, which changes when a model is retrained or
    re-exported into the same folder: of their bytes (for an adapter, which is small), or of their names, sizes
    and modification times (for a base model: hashing gigabytes would slow every run). None for a hub id."""
    if not os.path.isdir(folder):
        return None
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if WEIGHT_FILE.match(f)):
        path = os.path.join(folder, name)
        digest.update(name.encode() + b"\0")
        if content:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        else:
            stat = os.stat(path)
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _read_run_record(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, RUN_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("args", {}), dict):
        raise UsageError(f"{path} is not a JSON object with an 'args' object; fix or remove it")
    return record


def _trained_base_model(record: dict) -> str:
    """The base model run.json names: as finetune.py was given it, unless that is a relative path that does
    not resolve from here and the absolute folder it resolved to then still exists."""
    given = record.get("args", {}).get("base_model") or ""
    trained_from = record.get("base_model_dir")
    if given and not os.path.isabs(given) and not os.path.exists(given) and trained_from and os.path.isdir(trained_from):
        return trained_from
    return given


def _check_adapter_dir(adapter_dir: str) -> dict:
    """The adapter config; a clear error for a folder that is not an adapter checkpoint."""
    looks_like_full_model = os.path.isfile(os.path.join(adapter_dir, "config.json"))
    if looks_like_full_model and not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
        raise UsageError(
            f"{adapter_dir!r} holds a full model, not an adapter: pass it as --base_model and leave --lora_weights out"
        )
    if os.path.exists(os.path.join(adapter_dir, INCOMPLETE)):
        raise UsageError(f"{adapter_dir!r} was not saved whole (its run stopped while saving it); use another "
                         "checkpoint-N of the run, or its finished folder")
    return read_adapter_config(adapter_dir)


def _run_dir(adapter_dir: str) -> str:
    """Where an adapter's run record and template are: its own folder, or for a `checkpoint-N/` saved during
    training (which holds neither) the run's folder above it."""
    parent = os.path.dirname(os.path.abspath(adapter_dir))
    if CHECKPOINT_FOLDER.fullmatch(os.path.basename(os.path.abspath(adapter_dir))) and not os.path.isfile(
            os.path.join(adapter_dir, TEMPLATE_FILE)) and os.path.isfile(os.path.join(parent, TEMPLATE_FILE)):
        return parent
    return adapter_dir


def adapter_dir_flag(lora_weights: str, weights_path: str) -> str:
    """The checkpoint directory from --lora_weights or the seed's --weights_path ("" for none)."""
    if lora_weights and weights_path and os.path.normpath(lora_weights) != os.path.normpath(weights_path):
        raise UsageError("--lora_weights and --weights_path name the same thing; give one")
    return lora_weights or weights_path


def resolve_checkpoint(base_model: str = "", adapter_dir: str = "", prompt_template_name: str = "") -> Checkpoint:
    """The base model comes from the flag, else run.json (`_trained_base_model`), else adapter_config.json's
    base_model_name_or_path, else (with no adapter either) the bundled tiny model;
    the template from the flag, else the checkpoint's (or merged model's) prompt_template.json, else alpaca. A
    `checkpoint-N/` of a run takes both from the run's folder."""
    record, adapter_config = {}, {}
    run_dir = _run_dir(adapter_dir) if adapter_dir else ""
    if adapter_dir:
        adapter_config = _check_adapter_dir(adapter_dir)
        record = _read_run_record(run_dir)
    run_args = record.get("args", {})
    trained_on = _trained_base_model(record) or adapter_config.get("base_model_name_or_path") or ""
    base_model = base_model or trained_on
    if not base_model and adapter_dir:
        raise UsageError(f"no --base_model given and {adapter_dir}/{RUN_FILE} names none; pass --base_model PATH_OR_HUB_ID")
    if not base_model:
        base_model = bundled.BASE_MODEL
        print(f"no --base_model and no --lora_weights: using the bundled base model {base_model}")
    if prompt_template_name:
        prompter = Prompter.load(prompt_template_name)
    else:
        saved = [d for d in (run_dir, base_model) if d and os.path.isfile(os.path.join(d, TEMPLATE_FILE))]
        prompter = Prompter.load(saved[0] if saved else "alpaca")
    return Checkpoint(base_model, adapter_dir or None, prompter, run_args, trained_on)


def load_for_inference(checkpoint: Checkpoint, load_8bit: bool = False, load_4bit: bool = False,
                       trust_remote_code: bool = False, dtype=None):
    """(model, tokenizer): the base model (in `dtype`, default the machine's compute dtype) with the
    adapter applied, in eval mode (dropout off)."""
    load_config(checkpoint.base_model, trust_remote_code)  # first: a folder that is not a model is told so, in one line
    tokenizer = load_tokenizer(checkpoint.tokenizer_dir, trust_remote_code=trust_remote_code)
    model = load_base_model(checkpoint.base_model, load_8bit, load_4bit, dtype=dtype, trust_remote_code=trust_remote_code)
    if checkpoint.adapter_dir:
        model = load_adapter(model, checkpoint.adapter_dir)
    model.eval()
    return model, tokenizer
