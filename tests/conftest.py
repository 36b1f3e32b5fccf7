import os
import signal
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def ctrl_c_reaches_it() -> None:
    """`preexec_fn` of a child process that a test stops with SIGINT: a shell starts a background job (`.ci/run &`)
    with SIGINT ignored, which its children inherit, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(family)`: the path of a saved tiny random model of that family (made once)."""
    root = tmp_path_factory.mktemp("tiny-models")
    made = {}

    def get(family: str = "llama") -> str:
        if family not in made:
            made[family] = save_tiny_model(family, str(root / family))
        return made[family]

    return get


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llama_lora(llama, tmp_path_factory):
    """A finetune.py-style LoRA checkpoint of the tiny llama (weights moved off their init)."""
    from checkpoints import make_checkpoint

    return make_checkpoint(llama, str(tmp_path_factory.mktemp("ckpt") / "llama-lora"))


@pytest.fixture
def shared_data():
    """The real benchmark sets in ../shared/data; tests that need them skip when absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent (it holds the benchmark sets)")
    return SHARED_DATA


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more (run with -m slow)")
