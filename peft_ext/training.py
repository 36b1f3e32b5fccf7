"""What finetune.py needs around the HF Trainer: checks, resume, logging, the run record, saving."""
import importlib.metadata
import json
import netrc
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
from peft import (
    PeftConfig,
    PeftType,
    get_peft_model,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import BatchRebalanceSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from peft_ext import packing as packing_module
from peft_ext.checkpoint import CHECKPOINT_FOLDER
from peft_ext.errors import UsageError
from peft_ext.files import INCOMPLETE, canonical, check_writable, make_readable, write_json_atomic
from peft_ext.modeling import ADAPTER_CONFIG, load_adapter, mismatch, precision, read_adapter_config

# The finetune flags that describe the adapter; they travel together to peft_ext.adapters.build.
ADAPTER_FLAGS = (
    "target_modules", "lora_r", "lora_alpha", "lora_dropout", "num_virtual_tokens",
    "bottleneck_size", "non_linearity", "adapter_dropout", "use_parallel_adapter", "use_adapterp",
    "scaling", "init_weights", "embedding_lambda", "ffn",
)
# The adapter's dropouts: how it trains, not what it is, so check_resumable does not compare them.
DROPOUT_FLAGS = ("lora_dropout", "adapter_dropout")
# What a resumed run may change: how long it runs, how it saves, evaluates and logs, what only costs memory or
# time, and what check_resumable compares itself (the adapter's other flags; the base model, by the shapes it loads).
MAY_CHANGE_ON_RESUME = {
    "output_dir", "resume_from_checkpoint", "overwrite", "max_steps", "num_epochs", "eval_step", "save_step",
    "save_total_limit", "report_to", "wandb_project", "wandb_run_name", "wandb_watch", "wandb_log_model",
    "use_gradient_checkpointing", "packing", "trust_remote_code", "base_model", "adapter_name",
    *(flag for flag in ADAPTER_FLAGS if flag not in DROPOUT_FLAGS),
}
RUN_RECORD = "run.json"
# What a replaced run leaves at the top of its folder that says which adapter the folder holds (peft writes .bin
# for adapters saved without safetensors).
REPLACED_FILES = (RUN_RECORD, ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"
FINAL_STAGING = ".final-"
LIBRARIES = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "safetensors")


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation that makes micro batches on every process add up to `batch_size` exactly."""
    for name, value in (("--batch_size", batch_size), ("--micro_batch_size", micro_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise UsageError(
            f"--batch_size {batch_size} is not a multiple of --micro_batch_size {micro_batch_size} "
            f"x {world_size} process(es); choose sizes that divide evenly"
        )
    return batch_size // per_step


def check_schedule(num_epochs: float, max_steps: int, learning_rate: float, warmup_steps: int, eval_step: int,
                   save_step: int, has_validation: bool) -> None:
    """Refuse, before anything loads, what the Trainer or the optimizer would only refuse with a traceback once the
    model is loaded, or, for no epochs or steps, not at all (saving an untrained adapter as the result)."""
    if not learning_rate >= 0:
        raise UsageError(f"--learning_rate must be at least 0, got {learning_rate}")
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise UsageError(f"--warmup_steps must be a whole number of steps, at least 0; got {warmup_steps!r}")
    if max_steps == 0 or max_steps < -1:
        raise UsageError(f"--max_steps must be positive, or -1 to train for --num_epochs; got {max_steps}")
    if max_steps == -1 and not num_epochs > 0:
        raise UsageError(f"--num_epochs must be positive, got {num_epochs}; or give --max_steps")
    if save_step <= 0 or (has_validation and eval_step <= 0):
        raise UsageError("--eval_step and --save_step must be positive")
    # The best checkpoint is reloaded at the end, so every save must follow an evaluation.
    if has_validation and save_step % eval_step:
        raise UsageError(
            f"--save_step {save_step} must be a multiple of --eval_step {eval_step} when there is a validation set"
        )
    if 0 < max_steps <= warmup_steps:
        print(f"note: --warmup_steps {warmup_steps} is not below --max_steps {max_steps}: the learning rate stays in "
              "its warmup and never reaches --learning_rate")


@dataclass
class ResumePlan:
    checkpoint: str | None = None  # a checkpoint-N/ folder: optimizer, scheduler, RNG and data position
    warm_start: str | None = None  # a finished adapter folder: its weights only
    replaces: bool = False  # --overwrite over an earlier run: its checkpoint-N/ folders and run.json must go
    incomplete: list[str] = field(default_factory=list)  # checkpoint-N/ folders a stop left half-saved


def checkpoints(output_dir: str) -> list[str]:
    """The run's checkpoint-N/ folders, by step, whole or not."""
    found = [(int(m[1]), m[0]) for name in os.listdir(output_dir) if (m := CHECKPOINT_FOLDER.fullmatch(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found) if os.path.isdir(os.path.join(output_dir, name))]


def is_complete(checkpoint: str) -> bool:
    """Saved whole: the Trainer writes trainer_state.json after its other files, and AdapterTrainer removes the
    INCOMPLETE mark it put first once this project's own files are written too."""
    return os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)) and not os.path.exists(os.path.join(checkpoint, INCOMPLETE))


def resume_plan(resume_from_checkpoint, output_dir: str, overwrite: bool) -> ResumePlan:
    """Decide how this run starts, refusing to silently train over an earlier run's files."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir!r} is a file; give a directory path")
    check_writable(output_dir)
    if os.path.isfile(os.path.join(output_dir, TRAINER_STATE)):  # a run's checkpoint-N/ would mix two runs' files
        parent = os.path.dirname(os.path.normpath(output_dir)) or "."
        raise UsageError(f"--output_dir {output_dir!r} is a checkpoint of a run; to continue that run pass "
                         f"--output_dir {parent!r} --resume_from_checkpoint {output_dir!r}, or pick another --output_dir")
    saved = checkpoints(output_dir) if os.path.isdir(output_dir) else []
    has_run = bool(saved) or os.path.exists(os.path.join(output_dir, RUN_RECORD))
    if resume_from_checkpoint in (None, False, ""):
        if has_run and not overwrite:
            raise UsageError(
                f"{output_dir!r} already holds a run; continue it with --resume_from_checkpoint latest, "
                "replace it with --overwrite, or pick another --output_dir"
            )
        return ResumePlan(replaces=has_run)
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("latest", "last", "true"):
        whole = [c for c in saved if is_complete(c)]
        incomplete = [c for c in saved if c not in whole]
        if incomplete and int(os.environ.get("RANK", 0)) == 0:
            print(f"note: {', '.join(incomplete)} {'was' if len(incomplete) == 1 else 'were'} not saved whole (the run "
                  "stopped while saving), and will be removed; " +
                  (f"continuing from {whole[-1]}" if whole else "training from the start"))
        if whole:
            return ResumePlan(checkpoint=whole[-1], incomplete=incomplete)
        if os.path.exists(os.path.join(output_dir, RUN_RECORD)):
            raise UsageError(f"--resume_from_checkpoint latest: {output_dir!r} holds a finished run and no checkpoint-N "
                             "folder to continue from; replace it with --overwrite, or pick another --output_dir")
        # Nothing saved yet (stopped before the first --save_step): the same command works from the start, so a
        # job that always passes `latest` (a preemptible one, say) needs no other command for its first run.
        if not incomplete and int(os.environ.get("RANK", 0)) == 0:
            print(f"no checkpoint-N folder in {output_dir!r} yet: training from the start")
        return ResumePlan(incomplete=incomplete)
    path = str(resume_from_checkpoint)
    if is_complete(path):
        return ResumePlan(checkpoint=path)
    if CHECKPOINT_FOLDER.fullmatch(os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        raise UsageError(f"{path!r} was not saved whole (its run stopped while saving it); pass "
                         "--resume_from_checkpoint latest to continue from the run's last whole checkpoint-N")
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        check_warm_start(path)
        if has_run and not overwrite:
            raise UsageError(f"{output_dir!r} already holds a run, which a warm start from {path!r} would train over; "
                             "replace it with --overwrite, or pick another --output_dir")
        return ResumePlan(warm_start=path, replaces=has_run)
    raise UsageError(
        f"--resume_from_checkpoint {path!r} is neither a checkpoint-N folder nor an adapter folder; "
        "give one of those, or 'latest'"
    )


@dataclass
class Reporting:
    report_to: list[str]
    run_name: str | None


def _wandb_login_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def reporting(report_to: str, project: str, run_name: str, watch: str, log_model: str) -> Reporting:
    """wandb when a project is named (offline without a login, so it never prompts), else `report_to`."""
    project = project or os.environ.get("WANDB_PROJECT", "")
    if project:
        os.environ["WANDB_PROJECT"] = project
        if watch:
            os.environ["WANDB_WATCH"] = watch
        if log_model:
            os.environ["WANDB_LOG_MODEL"] = log_model
        if not os.environ.get("WANDB_MODE") and not _wandb_login_configured():
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no login configured, logging offline (sync later with `wandb sync`)")
        return Reporting(["wandb"], run_name or None)
    if report_to not in ("none", "tensorboard", "wandb"):
        raise UsageError(f"--report_to {report_to!r} is not supported; use none, tensorboard or wandb")
    return Reporting([report_to], run_name or None)


def prepare_base(model, quantized: bool, checkpointing: bool):
    """Freeze the base; for k-bit models, cast norms to fp32 and keep inputs differentiable."""
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False  # the cache only costs memory in training
    return model


# The settings that make an adapter what it is: its method, its shapes and where it sits. A checkpoint-N/ resumed
# under other values would fail to load its weights or optimizer state, or silently train something else.
ADAPTER_IDENTITY = ("peft_type", "r", "lora_alpha", "use_dora", "target_modules", "feedforward_modules",
                    "num_virtual_tokens", "bottleneck_size", "non_linearity", "use_parallel_adapter", "use_adapterp",
                    "scaling", "embedding_lambda", "ffn")


def discard(plan: ResumePlan, output_dir: str) -> None:
    """Once every check has passed: remove the checkpoint-N/ folders a stop left half-saved and, when this run
    replaces an earlier one, that run's checkpoint-N/ folders, run.json and adapter files, so that
    `--resume_from_checkpoint latest` can never continue the replaced run as if it were this one, nor evaluation and
    export use its adapter under this run's name should this run stop before its final save."""
    doomed = checkpoints(output_dir) if plan.replaces else plan.incomplete
    for folder in doomed:
        shutil.rmtree(folder)
    if plan.replaces:
        for name in REPLACED_FILES:
            if os.path.isfile(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))


def check_resumable(checkpoint: str, config, base_model: str) -> None:
    """Refuse, before the model loads, to resume `checkpoint` with flags that describe another adapter; note a base
    model of another name (a copy of the same model may have moved; one of other shapes fails as it loads)."""
    saved = read_adapter_config(checkpoint)
    trained_on = saved.get("base_model_name_or_path")
    if trained_on and canonical(trained_on) != canonical(base_model) and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {checkpoint} was trained on the base model {trained_on}; resuming on {base_model}")
    wanted = config.to_dict()

    def plain(value):
        value = getattr(value, "value", value)  # PeftType
        return sorted(map(str, value)) if isinstance(value, (list, tuple, set)) else value

    # None here is a default the tuner resolves when it builds (bottleneck targets), so it is not compared
    differ = [k for k in ADAPTER_IDENTITY if wanted.get(k) is not None and plain(saved.get(k)) != plain(wanted[k])]
    if "peft_type" in differ:
        differ = ["peft_type"]  # another method: its other settings say nothing more
    if differ:
        shown = ", ".join(f"{k} {plain(saved.get(k))!r} there, {plain(wanted.get(k))!r} here" for k in differ)
        raise UsageError(f"{checkpoint} holds another adapter than these flags make ({shown}); resume with the flags "
                         "it was trained with, or start a new run")


def check_warm_start(adapter_dir: str) -> None:
    if read_adapter_config(adapter_dir).get("peft_type") == PeftType.P_TUNING:
        raise UsageError(f"{adapter_dir!r} holds a p-tuning prompt as its encoder computed it, not the encoder, which "
                         "cannot go on training; continue its run from one of its checkpoint-N/ folders, which keep it")


def warm_start(model, adapter_dir: str):
    """Continue training a finished adapter: its config and weights, fresh optimizer and schedule."""
    print(f"warm start from {adapter_dir} (its adapter_config.json sets the method and its settings)")
    config = PeftConfig.from_pretrained(adapter_dir)
    if not config.is_prompt_learning:
        return load_adapter(model, adapter_dir, is_trainable=True)
    # peft loads a prompt (prompt or prefix tuning) for inference only: build the adapter, then load its weights
    config.inference_mode = False
    model = get_peft_model(model, config)
    try:
        set_peft_model_state_dict(model, load_peft_weights(adapter_dir, device=str(model.device)))
    except RuntimeError as e:
        raise UsageError(f"adapter {adapter_dir!r} does not fit this base model ({mismatch(e)})") from None
    return model


def resumed_at_the_end(trainer, checkpoint: str, output_dir: str) -> int | None:
    """The step of a resumed checkpoint-N/ when it ends a finished run in `output_dir` (its run.json written) and
    this run plans no more steps than that: the Trainer would still take one more step, and save it over the
    finished adapter."""
    if not os.path.isfile(os.path.join(output_dir, RUN_RECORD)):
        return None
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        done = json.load(f)["global_step"]
    planned = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    return done if done >= planned else None


def checkpoint_file(args, state, name: str) -> str:
    """A file of ours in the checkpoint-N/ folder the Trainer has just saved."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", name)


class RunClock(TrainerCallback):
    """The run's seconds (training, wall, CPU) across resumes: each checkpoint-N/ keeps the totals up to its step
    (FILE), and a run resumed from it counts on from them, so that run.json times the whole run."""

    FILE = "run_clock.json"

    def __init__(self, resume_dir: str | None, started: float):
        self.resume_dir, self.started = resume_dir, started  # started: time.time() when the script began
        self.before = {"train_seconds": 0.0, "wall_seconds": 0.0, "cpu_seconds": 0.0}

    def on_train_begin(self, args, state, control, **kwargs):
        path = os.path.join(self.resume_dir or "", self.FILE)
        kept = bool(self.resume_dir) and os.path.isfile(path)
        if kept:
            with open(path) as f:
                self.before = json.load(f)
        # a checkpoint from before the clock was kept: the time before it is unknown
        self.whole_run = kept or not state.global_step
        self.train_start, self.resumed_at, self.tokens_before = time.perf_counter(), state.global_step, state.num_input_tokens_seen

    def totals(self, training: bool = True) -> dict:
        """The seconds so far; `training`: the clock of training itself still runs (it stops at the end)."""
        train = (time.perf_counter() if training else self.train_end) - self.train_start
        return {"train_seconds": self.before["train_seconds"] + train,
                "wall_seconds": self.before["wall_seconds"] + time.time() - self.started,
                "cpu_seconds": self.before["cpu_seconds"] + _cpu_seconds()}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_json_atomic(checkpoint_file(args, state, self.FILE), self.totals())

    def on_train_end(self, args, state, control, **kwargs):
        self.train_end = time.perf_counter()


class RunSettings(TrainerCallback):
    """The run's flags, and its data file's hash, in each checkpoint-N/ (FILE), for `check_same_run`."""

    FILE = "run_settings.json"

    def __init__(self, settings: dict):
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_json_atomic(checkpoint_file(args, state, self.FILE), self.settings)


def check_same_run(checkpoint: str, settings: dict) -> None:
    """Refuse, before the model loads, to resume `checkpoint` with flags that change what it trains on or how (the
    data, learning rate, batch, template...): the run would mix two recipes, and run.json record only the second.
    A data file that moved is the same data when its hash is."""
    path = os.path.join(checkpoint, RunSettings.FILE)
    if not os.path.isfile(path):  # a checkpoint of an earlier version
        return
    with open(path) as f:
        saved = json.load(f)
    current = json.loads(json.dumps(settings, default=str))
    may_change = MAY_CHANGE_ON_RESUME | ({"data_path"} if saved.get("data_sha256") and current.get("data_sha256") else set())
    differ = sorted(k for k in current if k not in may_change and k in saved and saved[k] != current[k])
    if differ:
        shown = ", ".join(f"{k} {saved[k]!r} there, {current[k]!r} here" for k in differ)
        raise UsageError(f"{checkpoint} belongs to a run with other settings ({shown}); resume it with its own, or "
                         "start a new run (--overwrite, or another --output_dir)")


class TrainableState(TrainerCallback):
    """Keeps every trainable tensor in each checkpoint-N/ and restores it on resume.

    peft's adapter file is not always the training state: for p-tuning it holds the prompt the encoder
    computed, not the encoder, so resuming from it alone would not continue the same run.
    """

    FILE = "trainable_state.safetensors"

    def __init__(self, model, resume_dir: str | None):
        self.model, self.resume_dir = model, resume_dir

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            tensors = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(tensors, checkpoint_file(args, state, self.FILE))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_dir:
            self.restore(self.resume_dir)

    def on_train_end(self, args, state, control, **kwargs):
        # The Trainer has just loaded the best checkpoint's adapter file (with a validation set), which for p-tuning
        # put the encoder's output where its input goes, beside the last step's encoder: take the whole state.
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self.restore(state.best_model_checkpoint)

    def restore(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, self.FILE)
        if os.path.isfile(path):  # (a checkpoint of an earlier version has none)
            saved = load_file(path)
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if name in saved:
                        param.copy_(saved[name])


class AdapterTrainer(Trainer):
    """The HF Trainer with savings that leave every loss and gradient as they were.

    `packed_collator`, when given, collates the training batches (peft_ext.packing); `data_collator` still pads
    the evaluation ones, whose loss the Trainer weights by each batch's row count.
    """

    def __init__(self, *args, packed_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_collator = packed_collator

    def get_train_dataloader(self):
        if self.packed_collator is None:
            return super().get_train_dataloader()
        padded, self.data_collator = self.data_collator, self.packed_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = padded

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, BatchRebalanceSampler):
            sampler.seed = self.args.data_seed  # the library seeds it with a constant
        return sampler

    def _save_checkpoint(self, model, trial):
        # The Trainer writes checkpoint-N/ in place, and this project's callbacks add their files after it: mark
        # the folder INCOMPLETE first and unmark it once all is written, so that a stop in between never leaves
        # a folder that `--resume_from_checkpoint latest` would take for a whole one.
        self._unsealed = None
        if self.args.should_save:
            self._unsealed = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(self._unsealed, exist_ok=True)
            open(os.path.join(self._unsealed, INCOMPLETE), "w").close()
        super()._save_checkpoint(model, trial)

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        super()._maybe_log_save_evaluate(*args, **kwargs)  # saves, then runs the callbacks' on_save
        if getattr(self, "_unsealed", None):
            make_readable(self._unsealed)
            os.remove(os.path.join(self._unsealed, INCOMPLETE))
            self._unsealed = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except RuntimeError as e:
            raise UsageError(f"{resume_from_checkpoint} does not fit this base model ({mismatch(e)}); resume with the "
                             "--base_model it was trained on, or start a new run") from None

    def _determine_best_metric(self, metrics, trial):
        # Only an evaluation that a save follows (--save_step is a multiple of --eval_step) may be the best: the
        # Trainer would take an unsaved step's loss as the best to beat, keep loading an older checkpoint, and
        # never count a later saved one that beats every saved one.
        return self.control.should_save and super()._determine_best_metric(metrics, trial)

    def _run_epoch(self, *args, **kwargs):
        # Resumed at its last step (a run stopped between its final checkpoint and run.json), transformers would
        # take one step more before it checks the step count; finish the run as it is instead.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Batches are padded on the right, and in a causal LM no token attends to a later one, so the
        # padding mask hides nothing a labelled token would see. Without it attention runs the plain
        # causal kernel, which skips the masked half, instead of a dense masked one. A packed batch's mask
        # is all ones. (The Trainer counts real tokens from the mask of the batch it holds, which keeps it.)
        inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        if not packing_module.is_packed(inputs):
            return super().training_step(model, inputs, *args, **kwargs)
        # Around backward too: gradient checkpointing runs the layers' forward again there.
        with packing_module.attention_for(self.accelerator.unwrap_model(model)):
            return super().training_step(model, inputs, *args, **kwargs)


def make_trainer(
    model, tokenizer, train_set, val_set, *, output_dir, micro_batch_size, accumulation, num_epochs,
    max_steps, learning_rate, warmup_steps, eval_step, save_step, save_total_limit, group_by_length,
    checkpointing, seed, report: Reporting, resume_dir: str | None = None, packing: bool = True,
    started: float | None = None,
) -> Trainer:
    """The Trainer finetune.py trains with; `packing` packs each micro batch into one row where the model allows
    and it saves time (on a CPU). `started`: when the script began (time.time()), for the run's wall time."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dtype = precision()
    args = TrainingArguments(
        output_dir=os.path.abspath(output_dir),  # the path of the best checkpoint, kept in trainer_state.json, holds from any folder
        per_device_train_batch_size=micro_batch_size,
        per_device_eval_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=num_epochs,
        max_steps=max_steps,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        optim="adamw_torch",
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        logging_steps=10,
        logging_first_step=True,
        eval_strategy="steps" if val_set is not None else "no",
        eval_steps=eval_step if val_set is not None else None,
        save_strategy="steps",
        save_steps=save_step,
        save_total_limit=save_total_limit,
        load_best_model_at_end=val_set is not None,
        # Without --group_by_length each optimizer step takes a random set of batch_size examples, as with
        # plain random order, but sorts them by length before cutting them into micro batches (of varying
        # size, balanced in cost): far less padding, and the same loss, a mean over all the step's label
        # tokens however the step is cut (the Trainer divides by the step's label count).
        train_sampling_strategy="group_by_length" if group_by_length else "batch_rebalance",
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPUs run DDP over gloo
        ddp_find_unused_parameters=False if world_size > 1 else None,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to=report.report_to,
        run_name=report.run_name,
        seed=seed,
        data_seed=seed,
    )
    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    longest = max(len(ids) for ids in train_set["input_ids"]) if train_set is not None else 0
    packs = packing and packing_module.supports(model, longest) and packing_module.faster(model)
    return AdapterTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=collator,
        packed_collator=packing_module.PackingCollator() if packs else None,
        processing_class=tokenizer,
        callbacks=[RunClock(resume_dir, started or time.time()), TrainableState(model, resume_dir)],
    )


def peak_memory() -> tuple[int, str]:
    """(bytes, kind): peak GPU memory allocated on a GPU, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "gpu"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_rss"


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            found[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            found[lib] = None
    return found


def run_record(args: dict, trainer: Trainer, result, trainable: int, total: int, n_train: int, method: str) -> dict:
    """Everything a later reader (sweep tables, a reviewer) needs to know about this run, all of it and not only
    what followed a resume; `method`: the adapter trained (a warm start's, whatever --adapter_name says)."""
    state = trainer.state
    clock = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RunClock))
    seconds = clock.totals(training=False)
    train_losses = [[log["step"], log["loss"]] for log in state.log_history if "loss" in log]
    val_losses = [[log["step"], log["eval_loss"]] for log in state.log_history if "eval_loss" in log]
    memory, memory_kind = peak_memory()
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    return {
        "args": args,
        # The base model's folder made absolute, which evaluate.py and the exports fall back on when a relative
        # --base_model does not resolve from their own working directory; None for a hub id.
        "base_model_dir": os.path.realpath(args["base_model"]) if os.path.isdir(args["base_model"]) else None,
        "adapter": method,
        "versions": _versions(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "precision": precision(),
        "world_size": trainer.args.world_size,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "train_examples": n_train,
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": state.num_input_tokens_seen,
        "wall_seconds": seconds["wall_seconds"],
        "cpu_seconds": seconds["cpu_seconds"],  # unlike wall time, not stretched by other jobs on a shared machine
        "train_seconds": seconds["train_seconds"],
        # over the whole run, or over what followed the resume when the time before it is unknown
        "tokens_per_second": (state.num_input_tokens_seen - (0 if clock.whole_run else clock.tokens_before))
        / max(seconds["train_seconds"], 1e-9),
        "steps_per_second": (state.global_step - (0 if clock.whole_run else clock.resumed_at)) / max(seconds["train_seconds"], 1e-9),
        "resumed_at_step": clock.resumed_at or None,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "train_loss_mean": mean_train_loss(state.log_history, result.training_loss, clock.resumed_at, state.global_step),
        "final_train_loss": train_losses[-1][1] if train_losses else None,
        "final_val_loss": val_losses[-1][1] if val_losses else None,
        # The step whose adapter is saved: with a validation set, the saved checkpoint's of the lowest validation
        # loss, which the Trainer loads at the end; else the last.
        "adapter_step": int(best.rsplit("-", 1)[-1]) if best else state.global_step,
        "adapter_val_loss": state.best_metric if best else None,
        "loss_history": train_losses,
        "val_loss_history": val_losses,
    }


def mean_train_loss(log_history: list[dict], this_call: float, resumed_at: int, steps: int) -> float:
    """The mean loss of all the run's steps. The Trainer's covers the steps of this call only; those before a resume
    come from the logged losses, each the mean over the steps since the log before it (weighted as if it covered
    them all, which after an earlier resume may count a few unlogged steps at the logged mean)."""
    if not resumed_at:
        return this_call
    total, known, last = 0.0, 0, 0
    for log in log_history:
        if "loss" in log and log["step"] <= resumed_at:
            total, known, last = total + log["loss"] * (log["step"] - last), known + log["step"] - last, log["step"]
    return (total + this_call * (steps - resumed_at)) / max(known + steps - resumed_at, 1)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def verify_saved_adapter(model, directory: str) -> None:
    """Reload the saved weights and compare them with the live ones (catches empty or stale saves)."""
    saved = load_file(os.path.join(directory, "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model)
    if not saved or saved.keys() != live.keys():
        raise RuntimeError(f"saved adapter in {directory} holds {len(saved)} tensors, expected {len(live)}")
    for key, tensor in live.items():
        if not torch.equal(saved[key], tensor.detach().cpu().to(saved[key].dtype)):
            raise RuntimeError(f"saved adapter tensor {key} differs from the trained one")


def save_final(model, tokenizer, prompter, record: dict, output_dir: str) -> None:
    """Write the adapter, tokenizer and template beside the checkpoints, then run.json last."""
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # left by a run stopped during its final save
        if name.startswith(FINAL_STAGING):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    staging = tempfile.mkdtemp(dir=output_dir, prefix=FINAL_STAGING)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        prompter.save(staging)
        verify_saved_adapter(model, staging)
        make_readable(staging)
        for name in os.listdir(staging):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json_atomic(os.path.join(output_dir, RUN_RECORD), record)
