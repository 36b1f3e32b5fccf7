"""The offline default: a tiny pretrained model and a math set of our own, shipped in the repository, so
that `python finetune.py`, `evaluate.py` and `generate.py` run with no GPU and no model hub.

models/tiny-math/README.md says what the model is and how it was made; data/synth_math/ holds the
generated train and test sets (data/synth_math.py makes them).
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_MODEL = os.path.join(ROOT, "models", "tiny-math")
TRAIN_DATA = os.path.join(ROOT, "data", "synth_math", "train.json")
TEST_DATA = os.path.join(ROOT, "data", "synth_math", "test.json")
DATA_DIR = os.path.join(ROOT, "data")  # evaluate.py's default --data_dir: this project's data/, from any folder
TEST_SET = "synth_math"  # evaluate.py --dataset name of TEST_DATA (found under --data_dir)
OUTPUT_DIR = "./trained_models/lora"  # finetune.py's default output, generate.py's default checkpoint

# Training settings for the bundled model, where they differ from the seed's (which suit a 7B model):
# so small an adapter learns the task far better with a higher learning rate and the loss on the
# response only (models/tiny-math/README.md gives the measurements), and micro batches of 16 cost
# a CPU less time than four of 4.
TINY_RECIPE = {"learning_rate": 1e-3, "train_on_inputs": False, "micro_batch_size": 16}
SEED_RECIPE = {"learning_rate": 3e-4, "train_on_inputs": True, "micro_batch_size": 4}
# The finetune.py flags whose defaults this module decides, in the order finetune_defaults' caller reads them.
DECIDED_FLAGS = ("base_model", "data_path", "micro_batch_size", "learning_rate", "train_on_inputs")


def finetune_defaults(args: dict) -> dict:
    """finetune.py's arguments with the unset ones filled in: the bundled model, data and recipe when no
    --base_model is given, else the seed's defaults. Flags given explicitly always win."""
    bundled = not args["base_model"]
    filled = dict(args)
    filled["base_model"] = args["base_model"] or BASE_MODEL
    filled["data_path"] = args["data_path"] or TRAIN_DATA
    for name, value in (TINY_RECIPE if bundled else SEED_RECIPE).items():
        if filled[name] is None:
            filled[name] = value
    if args["micro_batch_size"] is None and isinstance(args["batch_size"], int):
        # never more than each process's share of a batch (under torchrun, WORLD_SIZE processes share it)
        share = max(1, filled["batch_size"] // int(os.environ.get("WORLD_SIZE", 1)))
        filled["micro_batch_size"] = min(filled["micro_batch_size"], share)
    defaulted = [f"--{name} {filled[name]}" for name in ("base_model", "data_path") if not args[name]]
    if defaulted:
        print(f"using the bundled offline default: {', '.join(defaulted)}")
    return filled
