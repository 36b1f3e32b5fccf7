"""Our adapter methods register with peft wherever adapters are built or loaded, each time in a fresh
interpreter (in this one, some earlier import has long registered them), and the small modules stay cheap."""
import os
import re
import subprocess
import sys

import pytest
from checkpoints import make_checkpoint

from peft_ext.errors import no_such_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTERED = (
    "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
    "print(M['BOTTLENECK'].__name__, M['LORA'].__name__)\n"
)


def fresh_python(code: str, stderr: list[str] | None = None) -> list[str]:
    """The words `code` prints, run by a new interpreter in the repository root (its stderr appended to `stderr`)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if stderr is not None:
        stderr.append(done.stderr)
    return done.stdout.split()


@pytest.fixture(scope="module")
def bottleneck_checkpoint(llama, tmp_path_factory):
    return make_checkpoint(llama, str(tmp_path_factory.mktemp("ckpt") / "llama-bottleneck"), "bottleneck")


def test_the_small_modules_import_without_torch_peft_or_transformers():
    heavy = fresh_python(
        "import sys, peft_ext.files, peft_ext.errors, peft_ext.bundled\n"
        "print(*[m for m in ('torch', 'peft', 'transformers') if m in sys.modules])\n"
    )
    assert heavy == []


def test_plain_peft_loads_our_adapters_after_importing_the_tuners(llama, bottleneck_checkpoint):
    """The promise of docs/adapters.md."""
    words = fresh_python(
        "import peft_ext.tuners\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({llama!r}), {bottleneck_checkpoint!r})\n"
        "print(type(model.base_model).__name__)\n" + REGISTERED
    )
    assert words == ["BottleneckModel", "BottleneckConfig", "SiboLoraConfig"]


def test_the_scripts_load_our_adapters_through_load_adapter(bottleneck_checkpoint):
    """evaluate.py, generate.py and the export scripts import nothing for it, and see no third-party noise."""
    stderr = []
    words = fresh_python(
        "from peft_ext.checkpoint import load_for_inference, resolve_checkpoint\n"
        f"model, _ = load_for_inference(resolve_checkpoint('', {bottleneck_checkpoint!r}))\n"
        "print(type(model.base_model).__name__)\n",
        stderr,
    )
    assert words == ["BottleneckModel"]
    assert "gemm_4bit_forward" not in stderr[0] and "is_gradient_checkpointing" not in stderr[0], stderr[0]


@pytest.mark.parametrize(
    "module", ["peft_ext.adapters", "peft_ext.export", "peft_ext.sibo", "peft_ext.tuners.bottleneck", "peft_ext.tuners"]
)
def test_each_module_that_registers_can_be_imported_first(module):
    """sibo and the bottleneck tuner import each other's pieces; any of them imported first works."""
    assert fresh_python(f"import {module}\n" + REGISTERED) == ["BottleneckConfig", "SiboLoraConfig"]


@pytest.mark.parametrize("script", ["finetune.py", "evaluate.py", "generate.py"])
def test_the_scripts_start_without_third_party_noise(script):
    """peft_ext quiets bitsandbytes' import-time message only if it is imported first (the CPU message shows on
    machines with AVX512-BF16, this project's CI among them)."""
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "gemm_4bit_forward" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("script", ["finetune.py", "evaluate.py", "generate.py", "export_hf_checkpoint.py",
                                    "export_state_dict_checkpoint.py"])
def test_help_describes_every_flag(script):
    """Every parameter of the function a script runs (the argument of its `run_cli`) is listed by --help and
    followed by a line saying what it does."""
    from peft_ext.errors import script_flags

    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PAGER": "cat"}, timeout=300)
    lines = (done.stdout + done.stderr).splitlines()
    for name in script_flags(os.path.join(ROOT, script)):
        at = next((i for i, line in enumerate(lines) if re.match(rf"\s+(-\w, )?--{name}=", line)), None)
        assert at is not None, f"{script}: --{name} is missing from --help"
        described = [line for line in lines[at + 1:at + 4]
                     if line.strip() and not line.strip().startswith(("Type:", "Default:", "-"))]
        assert described, f"{script}: --{name} has no description in --help"


def test_ctrl_c_ends_with_one_line_below_the_progress_bars(monkeypatch, capsys):
    """A KeyboardInterrupt deep in a run: the open progress bars are closed first, so the last line on stderr is
    the script's note of what is kept and how to go on, and the exit status is the shell's 130 for Ctrl-C."""
    from tqdm import tqdm

    from peft_ext.errors import run_cli

    def long_job():
        bar = tqdm(total=10, desc="training")
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["finetune.py"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(long_job, interrupted="checkpoints are kept; continue with --resume_from_checkpoint latest")
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.rstrip("\n").splitlines()[-1] == "interrupted: checkpoints are kept; continue with --resume_from_checkpoint latest"
    assert "Traceback" not in err and " 3/10 " in err


@pytest.mark.parametrize("argv, expected", [
    (["--overwrite", "false", "--steps", "2.0"], {"overwrite": False, "steps": 2, "rate": 0.5, "name": ""}),
    (["--overwrite", "yes", "--rate", "1", "--name", "2024"], {"overwrite": True, "steps": 1, "rate": 1, "name": "2024"}),
    (["--nooverwrite", "--steps", "None"], {"overwrite": False, "steps": None, "rate": 0.5, "name": ""}),
    (["--name", "3,4"], {"overwrite": False, "steps": 1, "rate": 0.5, "name": "3,4"}),
    (["--name", "SVAMP,AddSub"], {"overwrite": False, "steps": 1, "rate": 0.5, "name": "SVAMP,AddSub"}),
    (["--overwrite", "maybe"], "error: --overwrite must be True or False, got 'maybe'"),
    (["--steps", "2.5"], "error: --steps must be a whole number, got 2.5"),
    (["--rate", "abc"], "error: --rate must be a number, got 'abc'"),
    # fire would run the script with the flags it knows and complain of a misspelt one only afterwards
    (["--step", "3"], "error: script.py has no flag --step; did you mean --steps? `python script.py --help` lists its flags"),
    (["--steps=3", "--verbose"], "error: script.py has no flag --verbose; `python script.py --help` lists its flags"),
    (["--name", "--lora_r 16"], "error: --name '--lora_r 16' reads as two flags: write --name='--lora_r 16', with the '='"),
    (["--name=--lora_r 16", "-s", "3"], {"overwrite": False, "steps": 3, "rate": 0.5, "name": "--lora_r 16"}),
    (["-r", "2"], "error: The argument '-r' is ambiguous as it could refer to any of the following arguments: "
                  "['rate', 'rank']; spell the flag out"),
    (["True", "2", "0.25", "x", "0", "extra"], "error: unexpected argument 'extra': script.py takes its settings as --flags "
                                         "(`python script.py --help` lists them); a value that starts with '-' needs --flag=VALUE"),
])
def test_flags_are_held_to_their_annotated_types(argv, expected, monkeypatch, capsys):
    """fire reads `--overwrite false` as the (true) string 'false': a script must take it as False, and refuse
    a value of the wrong kind in one line instead of failing deep inside a run."""
    from peft_ext.errors import run_cli

    seen = {}

    def script(overwrite: bool = False, steps: int = 1, rate: float = 0.5, name: str = "", rank: int = 0):
        seen.update(overwrite=overwrite, steps=steps, rate=rate, name=name)

    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    if isinstance(expected, dict):
        run_cli(script)
        assert seen == expected and type(seen["steps"]) is type(expected["steps"])
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(script)
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == expected and not seen


def test_help_among_other_flags_shows_help_without_running(monkeypatch, capsys):
    """`--steps 3 --help` would run the script first under fire, then show its help."""
    from peft_ext.errors import run_cli

    ran = []

    def script(steps: int = 1):
        """Counts steps."""
        ran.append(steps)

    monkeypatch.setattr(sys, "argv", ["script.py", "--steps", "3", "--help"])
    monkeypatch.setenv("PAGER", "cat")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script)
    assert exit_info.value.code == 0 and not ran
    out = capsys.readouterr()
    assert "--steps=STEPS" in out.out + out.err
