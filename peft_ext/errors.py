"""Bad input ends a script with one clear line on stderr and a non-zero exit, never a traceback; so does Ctrl-C."""
import ast
import difflib
import errno
import functools
import inspect
import os
import sys

import fire
import fire.core
import fire.inspectutils
import fire.parser
from tqdm import tqdm


class UsageError(Exception):
    """An input problem the user can fix; its message names the problem and the fix."""


# A disk that fills up or turns read-only mid-run is the machine's problem, not the code's: one line, no traceback.
DISK_ERRORS = {
    errno.ENOSPC: "free some space, or choose another output folder, and run the command again",
    errno.EDQUOT: "free some of your quota, or choose another output folder, and run the command again",
    errno.EROFS: "the disk is read-only: choose another output folder",
}


def run_cli(fn, interrupted: str = "") -> None:
    """`fire.Fire(fn)`, turning a UsageError into `error: ...` on stderr and exit status 2, a full or read-only
    disk into `error: ...` and status 1, and Ctrl-C into `interrupted: ...` (what is kept and how to go on, as
    `interrupted` says) and the shell's status 130."""
    if "peft_ext.quiet_start" in sys.modules:
        sys.modules["peft_ext.quiet_start"].ready()
    try:
        args = sys.argv[1:]
        if "-h" in args or "--help" in args:
            args = ["--help"]  # fire would run the script first when other flags come before it, then show help
        else:
            _refuse_unknown(fn, args)
        fire.Fire(_typed(fn), command=args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror}{where}; {DISK_ERRORS[e.errno]}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        for bar in list(getattr(tqdm, "_instances", ())):  # closed now, not redrawn at exit below the message
            bar.close()
        print(f"\ninterrupted{': ' + interrupted if interrupted else ''}", file=sys.stderr)
        sys.exit(130)


def _refuse_unknown(fn, args: list[str]) -> None:
    """fire runs a script with the flags it knows and complains of the others only once the run is over, so a
    misspelt `--num_epoch 1` would train with the default epochs first. Here the command line is read as fire
    will read it (its own parser: fire is pinned in requirements.txt) and refused before any work."""
    args, _ = fire.parser.SeparateFlagArgs(args)  # what follows a final `--` is fire's own flags
    spec = fire.inspectutils.GetFullArgSpec(fn)
    try:
        given, unknown, positional = fire.core._ParseKeywordArgs(args, spec)
    except fire.core.FireError as e:  # `-l`, which could be --learning_rate or --lora_r
        raise UsageError(f"{e}; spell the flag out") from None
    script = os.path.basename(sys.argv[0])
    for flag in [arg for arg in unknown if fire.core._IsFlag(arg)]:
        at = args.index(flag)
        if " " in flag and at and fire.core._IsFlag(args[at - 1]):  # `--finetune_args "--lora_r 16"`
            raise UsageError(f"{args[at - 1]} {flag!r} reads as two flags: write {args[at - 1]}={flag!r}, with the '='")
        raise no_such_flag(script, flag, spec.args)
    free = [name for name in spec.args if name not in given]
    if len(positional) > len(free):
        raise UsageError(f"unexpected argument {positional[len(free)]!r}: {script} takes its settings as --flags "
                         f"(`python {script} --help` lists them); a value that starts with '-' needs --flag=VALUE")


def no_such_flag(script: str, flag: str, known: list[str]) -> UsageError:
    """The error for a `flag` (as typed: `--num_epoch`, `--lora-rr=4`) that is none of `script`'s `known` flags."""
    name = flag.lstrip("-").split("=", 1)[0]
    wanted = name.replace("-", "_")
    # a flag of which this is a word (--share for --share_gradio, --port for --server_port), else a misspelling
    close = [flag for flag in known if wanted in flag.split("_")][:1] or difflib.get_close_matches(wanted, known, n=1)
    hint = f"did you mean --{close[0]}? " if close else ""
    return UsageError(f"{script} has no flag --{name}; {hint}`python {script} --help` lists its flags")


def script_flags(path: str) -> list[str]:
    """The flags of a script that ends in `run_cli(fn)`: the parameters of `fn`, read from the script's source
    (importing it would load torch)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    entry = next(node.args[0].id for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_cli")
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == entry)
    return [arg.arg for arg in function.args.args]


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _typed(fn):
    """`fn` with its flags held to their annotated types. fire guesses each value's type from its text, so
    `--overwrite false` arrives as the string 'false' (which Python takes as true) and `--batch_size 2.5` as a
    float that fails deep inside a run; here they become False, or a one-line error before any work."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)  # fire reads the signature and docstring through the wrapper
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            bound.arguments[name] = _as_annotated(name, value, signature.parameters[name].annotation)
        return fn(*bound.args, **bound.kwargs)

    return call


def _as_annotated(name: str, value, annotation):
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is bool:
        text = str(value).strip().lower()
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise UsageError(f"--{name} must be True or False, got {value!r}")
    if annotation is int:
        if number and float(value).is_integer():
            return int(value)
        raise UsageError(f"--{name} must be a whole number, got {value!r}")
    if annotation is float:
        if number:
            return value
        raise UsageError(f"--{name} must be a number, got {value!r}")
    if annotation is str and (number or isinstance(value, bool)):
        return str(value)  # `--output_dir 2024`, `--model 7`
    if annotation is str and isinstance(value, (list, tuple)):
        return ",".join(map(str, value))  # `--prompt 3,4` and `--dataset SVAMP,AddSub`, which fire splits, as typed
    return value
