"""Ctrl-C at any time ends each script with one line and the shell's status 130, also while its libraries load."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, ctrl_c_reaches_it

SCRIPTS = ["finetune.py", "evaluate.py", "generate.py", "export_hf_checkpoint.py", "export_state_dict_checkpoint.py",
           "benchmarks/eval_throughput.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_the_libraries_load_is_one_line(script):
    """0.3 s in, torch and transformers are still loading (they take seconds): a traceback through their imports
    before, one line now."""
    process = subprocess.Popen([sys.executable, script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=ctrl_c_reaches_it)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.strip() == "interrupted while starting: nothing was done"


def test_importing_a_script_leaves_ctrl_c_alone():
    """A program that imports finetune.py (a benchmark, a notebook) keeps Python's own Ctrl-C: KeyboardInterrupt,
    which its `except` and `finally` see, not a hard exit."""
    check = "import signal, finetune; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=ctrl_c_reaches_it, timeout=120)
    assert done.returncode == 0, done.stderr
