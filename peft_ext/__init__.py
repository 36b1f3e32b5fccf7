"""Shared code of the llm-adapters scripts.

Importing the package imports nothing heavy, so small modules such as `peft_ext.files` load in milliseconds.
Our own adapter methods register with peft when `peft_ext.tuners` is imported; the modules that build or load
adapters (`peft_ext.adapters`, `peft_ext.modeling.load_adapter`) import it themselves.
"""
import logging
import warnings


class _Once(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


# Third-party noise on every run, about nothing these scripts depend on: bitsandbytes' CPU backend says at import
# that an optional kernel from the hub is not installed (its CPU 4-bit path works without it), peft 0.21 reads
# a model property that transformers 5 deprecated, and peft's generate for prompt and p-tuning drops the position
# ids that transformers' generate passes (harmless here: such batches hold prompts of one length, unpadded).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning", category=UserWarning)
# bitsandbytes' 8-bit matmul logs that it casts its input to float16 at every call of every layer (thousands of
# lines per run in bf16 or fp32); once is enough.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Once())
