"""Train several adapters on one data set, score each on benchmark sets, and tabulate and plot them.

    python benchmarks/sweep.py          # the bundled offline default: 5 adapters on models/tiny-math
    python benchmarks/sweep.py --base_model PATH --data_path math_data.json \
        --adapters lora,adapterh,adapterp,parallel,prefix-tuning --datasets math --output_dir ./sweeps/llama-math

It drives finetune.py and evaluate.py as a user would, each as its own process, and reads back only
the files they write. OUTPUT_DIR then holds:
- ADAPTER/: finetune.py's checkpoint directory (run.json, the adapter, checkpoint-N/);
- eval/: evaluate.py's output (MODEL-ADAPTER/DATASET/metrics.json, predictions.jsonl, results.csv);
- resources.md/.csv, accuracy.md/.csv, accuracy.png, loss.png.
Run the same command again to continue: a finished adapter is not retrained, an interrupted one resumes
from its newest whole checkpoint-N/, and evaluate.py continues a partial evaluation. A second run of a
finished sweep starts no process and only rewrites the tables.
"""
import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys

from fire.parser import DefaultParseValue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # peft_ext
from peft_ext.bundled import BASE_MODEL, DATA_DIR, TEST_DATA, TINY_RECIPE, TRAIN_DATA  # noqa: E402
from peft_ext.errors import UsageError, no_such_flag, run_cli, script_flags  # noqa: E402
from peft_ext.files import (  # noqa: E402
    atomic_open,
    file_sha256,
    folder_lock,
    run_folder,
    write_json_atomic,
    write_text_atomic,
)

ADAPTERS = "lora,adapterh,adapterp,parallel,prefix-tuning"
SWEEP_RECORD = "sweep.json"  # in evaluate's run folder: what a finished evaluation was asked, its metrics files

# The LLM-Adapters paper's math runs on LLaMA-7B (math_running_commands and the maintainers' answers in
# issues #38/#45), as finetune.py flags. Target names are the LLaMA family's (also Mistral's and Qwen2's);
# on other families finetune.py's per-family default targets are used instead.
PAPER_COMMON = dict(batch_size=16, micro_batch_size=4, num_epochs=3, learning_rate=3e-4, cutoff_len=256)
PAPER = {
    "lora": dict(
        lora_r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], val_set_size=0
    ),
    "adapterh": dict(bottleneck_size=256, target_modules=["up_proj", "gate_proj"]),
    "adapterp": dict(bottleneck_size=256, target_modules=["down_proj"]),
    "parallel": dict(bottleneck_size=256, target_modules=["up_proj", "down_proj"], val_set_size=0),
    "prefix-tuning": dict(num_virtual_tokens=10, learning_rate=3e-2, batch_size=8, num_epochs=5),
}
LLAMA_NAMED = ("llama", "mistral", "qwen2")

# The bundled tiny-math model (hidden size 128) needs the paper's settings scaled down. Bottleneck 32: the
# paper's 256 is wider than this model, and a quarter of its width is still a bottleneck. LoRA r 8 on the
# paper's targets (r 32 would be a quarter of the width too, four times the bundled recipe's tested
# rank). Everything else on finetune.py's recipe for the bundled model (TINY_RECIPE: micro batch 16, the loss
# on the response only, learning rate 1e-3, since a tiny model and a short run need bigger steps: LoRA at 1e-3
# reaches 88.8% where the seed's 3e-4 reaches 42%, models/tiny-math/README.md) for 3 epochs; prefix tuning
# keeps its far higher rate (x30, as in the paper).
BUNDLED_COMMON = dict(TINY_RECIPE, num_epochs=3, val_set_size=0)
BUNDLED = {
    "lora": dict(lora_r=8, lora_alpha=16),
    "adapterh": dict(bottleneck_size=32),
    "adapterp": dict(bottleneck_size=32),
    "parallel": dict(bottleneck_size=32),
    "prefix-tuning": dict(learning_rate=3e-2, batch_size=16, num_epochs=3),
}


def key(label: str) -> str:
    return label.strip().lower().replace("_", "-")


def model_type(base_model: str) -> str:
    local = os.path.join(base_model, "config.json")
    if os.path.isfile(local):
        return read_json(local).get("model_type", "")
    from transformers import AutoConfig  # a hub id: its config (loads transformers, so only then)

    try:
        return AutoConfig.from_pretrained(base_model).model_type
    except OSError as e:
        raise UsageError(
            f"--base_model {base_model!r} is neither a model folder nor a reachable hub id ({e})"
        ) from None


# The flags the sweep sets for each run itself, with the sweep's own flag to use instead.
OWN_FINETUNE_FLAGS = {"output_dir": "--output_dir", "adapter_name": "--adapters", "base_model": "--base_model",
                      "data_path": "--data_path", "resume_from_checkpoint": "(resuming is automatic)"}
OWN_EVALUATE_FLAGS = {"output_dir": "--output_dir", "model": "--base_model", "adapter": "--adapters",
                      "lora_weights": "--adapters", "weights_path": "--adapters", "base_model": "--base_model",
                      "dataset": "--datasets", "batch_size": "--eval_batch_size", "max_examples": "--max_examples",
                      "data_dir": "--data_dir"}


def check_passed_flags(option: str, texts: list[str], script: str, own: dict[str, str]) -> None:
    """Refuse flags in --finetune_args or --evaluate_args that `script` does not have, now rather than when
    the adapters before the one they are for have trained, and those the sweep sets itself: they would send a
    run's files where the sweep does not look for them."""
    known = script_flags(os.path.join(ROOT, script))
    for text in texts:
        for name in parse_flags(text):
            if name not in known and not (name.startswith("no") and name[2:] in known):  # fire's --noflag
                raise UsageError(f"{option}: {no_such_flag(script, '--' + name, known)}")
            if name in own:
                raise UsageError(f"{option} cannot set --{name}: the sweep sets it for each run; use {own[name]}")


def parse_flags(text: str) -> dict:
    """'--lora_r 16 --train_on_inputs=False --use-adapterp' -> {'lora_r': '16', ...} (values as typed; names with
    '_' for '-', as fire reads them)."""
    flags, words = {}, shlex.split(text)
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            name = name.replace("-", "_")
            if not value and i + 1 < len(words) and not words[i + 1].startswith("--"):
                value = words[i + 1]
            flags[name] = value or "True"
        elif i == 0 or not words[i - 1].startswith("--") or "=" in words[i - 1]:
            raise UsageError(f"{word!r} in {text!r} is not a --flag or a flag's value")
    return flags


def flag_text(value) -> str:
    """A value as finetune.py's command line takes it (fire reads '[a,b]' back as a list)."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def as_recorded(value):
    """What run.json's "args" holds for a flag given as `value` on the command line."""
    return json.loads(json.dumps(DefaultParseValue(flag_text(value))))


def training_flags(label, base_model, data_path, bundled, family, overrides, finetune_args) -> dict:
    """finetune.py's flags for one adapter: the paper's settings (scaled for the bundled model), then
    the sweep-wide overrides, then --finetune_args (for all adapters, or per adapter)."""
    name = key(label)
    flags = dict(PAPER_COMMON, **PAPER.get(name, {}))
    if family not in LLAMA_NAMED:
        flags.pop("target_modules", None)
    if bundled:
        flags.update(BUNDLED_COMMON, **BUNDLED.get(name, {}))
    flags.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(finetune_args, dict):
        by_key = {key(k): v for k, v in finetune_args.items()}  # as --adapters names them: any case, - or _
        extra = " ".join(str(by_key.get(k, "")) for k in ("all", name))
    else:
        extra = str(finetune_args or "")
    flags.update(parse_flags(extra))
    return dict(flags, base_model=base_model, data_path=data_path, adapter_name=label)


def train(label: str, flags: dict, adapter_dir: str) -> bool:
    """Make sure `adapter_dir` holds a finished run of these flags; returns whether it trained."""
    record_path = os.path.join(adapter_dir, "run.json")
    if os.path.isfile(record_path):
        recorded = read_json(record_path)["args"]
        changed = sorted(k for k, v in flags.items() if recorded.get(k) != as_recorded(v))
        if changed:
            raise UsageError(
                f"{adapter_dir} holds a {label} run made with other settings ({', '.join(changed)} differ); "
                "delete that folder to retrain it, or choose another --output_dir"
            )
        print(f"{label}: trained before ({record_path})")
        return False
    command = [sys.executable, os.path.join(ROOT, "finetune.py"), f"--output_dir={adapter_dir}"]
    command += [f"--{k}={flag_text(v)}" for k, v in flags.items()]
    interrupted = os.path.isdir(adapter_dir) and any(n.startswith("checkpoint-") for n in os.listdir(adapter_dir))
    if interrupted:
        command.append("--resume_from_checkpoint=latest")
    print(f"{label}: {'resuming' if interrupted else 'training'}: {shlex.join(command)}", flush=True)
    run(command, f"finetune.py for {label}", "--finetune_args")
    return True


def eval_record(run_dir: str, asked: dict) -> dict | None:
    """The sweep's record of a finished evaluation that was asked for exactly this, of data files that are still as
    they were scored (else evaluate.py runs again, and refuses to mix in what was scored on other data), or None."""
    path = os.path.join(run_dir, SWEEP_RECORD)
    record = read_json(path) if os.path.isfile(path) else {}
    if record.get("asked") != asked:
        return None
    for metrics_path in record["metrics"]:
        metrics_path = os.path.join(run_dir, metrics_path)
        scored = read_json(metrics_path) if os.path.isfile(metrics_path) else None
        if not scored or not os.path.isfile(scored["file"]) or file_sha256(scored["file"]) != scored["settings"]["data_sha256"]:
            return None
    return record


def evaluate(label: str, model_label: str, adapter_dir: str, run_dir: str, asked: dict) -> list[str]:
    """Score `adapter_dir` as evaluate.py's run MODEL_LABEL-LABEL on the sets and with the flags `asked`
    names; returns their metrics.json paths, in order."""
    record = eval_record(run_dir, asked)
    if record:
        print(f"{label}: evaluated before ({os.path.join(run_dir, SWEEP_RECORD)})")
    else:
        command = [
            sys.executable, os.path.join(ROOT, "evaluate.py"), f"--lora_weights={adapter_dir}",
            f"--output_dir={os.path.dirname(run_dir)}", f"--model={model_label}", f"--adapter={label}",
            f"--dataset={asked['dataset']}", *asked["flags"],
        ]
        print(f"{label}: evaluating: {shlex.join(command)}", flush=True)
        run(command, f"evaluate.py for {label}", "--evaluate_args")
        names = benchmark_names(asked["dataset"], asked["flags"])
        record = {"asked": asked, "metrics": [os.path.join(n, "metrics.json") for n in names]}
        write_json_atomic(os.path.join(run_dir, SWEEP_RECORD), record)
    return [os.path.join(run_dir, p) for p in record["metrics"]]


def benchmark_names(datasets: str, eval_flags: list[str]) -> list[str]:
    """The sets `--dataset` expands to, as evaluate.py names their folders (asked of its own code,
    imported only when there is work to do: it loads torch and peft)."""
    from peft_ext.evaluation import resolve_tasks

    given = parse_flags(shlex.join(eval_flags))
    skip_missing = as_recorded(given.get("skip_missing", False)) is True
    return [task.benchmark.name for task in resolve_tasks(datasets, given.get("data_dir", DATA_DIR), skip_missing=skip_missing)[0]]


def check_adapters(flags: dict[str, dict]) -> None:
    """Each adapter's name and sizes, checked as finetune.py will check them, so that a misspelt one fails now
    and not after the adapters before it have trained (imported only when there is training to do: it loads
    torch and peft)."""
    from peft_ext.adapters import resolve

    for label, adapter_flags in flags.items():
        try:  # the values as finetune.py's command line will read them (--finetune_args gives them as text)
            resolve(label, {name: as_recorded(value) for name, value in adapter_flags.items()})
        except UsageError as e:
            raise UsageError(f"--adapters {label}: {e}") from None


def run(command: list[str], what: str, flags_via: str) -> None:
    """Run a script; `flags_via`: the sweep's flag that passes it more flags, named when it refused its input."""
    finished = subprocess.run(command)
    if finished.returncode:
        hint = f"; a flag it asks for goes to it through {flags_via}" if finished.returncode == 2 else ""
        raise UsageError(f"{what} stopped with exit status {finished.returncode} (its output is above){hint}")


# ---- tables and plots


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def markdown(header: list[str], rows: list[list], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in [header, align, *rows]) + "\n"


def resource_tables(records: dict[str, dict]) -> tuple[str, str]:
    rows = [
        {
            "adapter": label,
            "trainable_params": r["trainable_params"],
            "total_params": r["total_params"],
            "trainable_percent": round(r["trainable_percent"], 4),
            "peak_memory_mib": round(r["peak_memory_bytes"] / 2**20, 1),
            "peak_memory_kind": r["peak_memory_kind"],
            "wall_seconds": round(r["wall_seconds"], 1),
            "train_seconds": round(r["train_seconds"], 1),
            "cpu_seconds": round(r["cpu_seconds"], 1) if r.get("cpu_seconds") is not None else None,
            "tokens_per_second": round(r["tokens_per_second"], 1),
            "steps": r["steps"],
            "final_train_loss": r["final_train_loss"],
        }
        for label, r in records.items()
    ]
    memory = {"gpu": "GPU", "cpu_rss": "RSS"}
    header = [
        "Adapter", "Trainable params", "% of total", "Peak memory (MiB)", "Wall time (s)", "CPU time (s)", "Tokens/s",
        "Steps", "Final loss",
    ]
    md_rows = [
        [row["adapter"], f"{row['trainable_params']:,}", f"{row['trainable_percent']:.2f}",
         f"{row['peak_memory_mib']:,.0f} {memory.get(row['peak_memory_kind'], row['peak_memory_kind'])}",
         f"{row['wall_seconds']:,.0f}", "–" if row["cpu_seconds"] is None else f"{row['cpu_seconds']:,.0f}",
         f"{row['tokens_per_second']:,.0f}", row["steps"],
         "–" if row["final_train_loss"] is None else f"{row['final_train_loss']:.3f}"]
        for row in rows
    ]
    return markdown(header, md_rows), csv_text(rows)


def accuracy_by_adapter(metrics: dict[str, list[dict]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(the sets in order, {adapter: {set: accuracy in percent, and "Avg" over the sets}})."""
    datasets = list(dict.fromkeys(m["dataset"] for ms in metrics.values() for m in ms))
    table = {}
    for label, ms in metrics.items():
        scores = {m["dataset"]: 100 * m["accuracy"] for m in ms}
        table[label] = {**scores, "Avg": sum(scores.values()) / len(scores)}
    return datasets, table


def accuracy_tables(datasets: list[str], table: dict[str, dict[str, float]]) -> tuple[str, str]:
    columns = [*datasets, "Avg"]
    md_rows = [[label, *(f"{scores[c]:.1f}" for c in columns)] for label, scores in table.items()]
    rows = [{"adapter": label, **{c: round(scores[c], 2) for c in columns}} for label, scores in table.items()]
    return markdown(["Adapter", *columns], md_rows), csv_text(rows)


def pyplot():
    """matplotlib, imported only to draw (it takes a while) and drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: str, datasets: list[str], table: dict[str, dict[str, float]], title: str) -> None:
    groups = [*datasets, "Avg"] if len(datasets) > 1 else datasets
    width = 0.8 / len(table)
    fig, ax = pyplot().subplots(figsize=(min(14.0, max(6.0, 0.3 * len(groups) * len(table) + 3)), 4.5))
    for i, (label, scores) in enumerate(table.items()):
        xs = [g + (i - (len(table) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [scores[d] for d in groups], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, path)


def plot_loss(path: str, records: dict[str, dict], title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for label, record in records.items():
        steps, losses = zip(*record["loss_history"]) if record["loss_history"] else ((), ())
        ax.plot(steps, losses, label=label, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")  # the first steps' loss is many times the last ones'
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    pyplot().close(fig)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(
    base_model: str = "",
    data_path: str = "",
    adapters: str = ADAPTERS,
    datasets: str = "",
    output_dir: str = "./sweeps/tiny-math",
    num_epochs: float = None,
    max_steps: int = None,
    learning_rate: float = None,
    batch_size: int = None,
    micro_batch_size: int = None,
    cutoff_len: int = None,
    finetune_args="",
    eval_batch_size: int = 16,
    max_examples: int = 0,
    data_dir: str = DATA_DIR,
    evaluate_args: str = "",
):
    """Train each of ADAPTERS on DATA_PATH, evaluate each on DATASETS, and write OUTPUT_DIR/resources.md/.csv,
    accuracy.md/.csv, accuracy.png and loss.png. Per-adapter defaults are the LLM-Adapters paper's math
    settings (LoRA r 32 on q,k,v,up,down; bottleneck 256; prefix tuning 10 tokens at 3e-2), scaled down
    for the bundled tiny model; benchmarks/README.md lists both.

    Args:
        base_model: model folder or hub id; default: the bundled models/tiny-math, with settings scaled for it.
        data_path: training data, as finetune.py takes it; default: the bundled data/synth_math/train.json.
        adapters: comma list of finetune.py adapter names; each is also its folder and its label.
        datasets: evaluate.py's --dataset (names, suites such as math, paths); default: the bundled test set.
        output_dir: where the checkpoints, evaluations, tables and plots go.
        num_epochs: for every adapter, replacing its default.
        max_steps: for every adapter (-1: train num_epochs).
        learning_rate: for every adapter, replacing its default.
        batch_size: for every adapter, replacing its default.
        micro_batch_size: for every adapter, replacing its default.
        cutoff_len: for every adapter, replacing its default.
        finetune_args: more finetune.py flags: --finetune_args='--save_step 100' for every adapter, or per adapter --finetune_args='{"lora": "--lora_r 16", "all": "--save_step 100"}'.
        eval_batch_size: evaluate.py's --batch_size.
        max_examples: score the first N examples of each set (0: all).
        data_dir: where evaluate.py finds named sets (DATA_DIR/NAME/test.json); default: this project's data/.
        evaluate_args: more evaluate.py flags, the same for every adapter: --evaluate_args='--num_beams 4'.
    """
    # parse
    bundled = not base_model
    base_model = base_model or BASE_MODEL
    data_path = data_path or TRAIN_DATA
    datasets = ",".join(datasets) if isinstance(datasets, list | tuple) else str(datasets or TEST_DATA)
    labels = [a.strip() for a in (adapters.split(",") if isinstance(adapters, str) else adapters) if a.strip()]
    if not labels or len(set(map(key, labels))) != len(labels):
        raise UsageError(f"--adapters must name one or more different adapters, got {adapters!r}")
    if isinstance(finetune_args, dict) and not set(map(key, finetune_args)) <= {"all", *map(key, labels)}:
        raise UsageError(
            f"--finetune_args keys must be 'all' or adapters of --adapters {labels}, got {sorted(finetune_args)}"
        )
    check_passed_flags("--finetune_args", [str(v) for v in finetune_args.values()] if isinstance(finetune_args, dict)
                       else [str(finetune_args or "")], "finetune.py", OWN_FINETUNE_FLAGS)
    check_passed_flags("--evaluate_args", [str(evaluate_args or "")], "evaluate.py", OWN_EVALUATE_FLAGS)
    if eval_batch_size < 1 or max_examples < 0:
        raise UsageError("--eval_batch_size must be at least 1 and --max_examples at least 0")
    # Absolute local paths, so that a run started from another folder still matches its run.json.
    base_model, data_path = (os.path.abspath(p) if os.path.exists(p) else p for p in (base_model, data_path))
    overrides = dict(num_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate,
                     batch_size=batch_size, micro_batch_size=micro_batch_size, cutoff_len=cutoff_len)
    eval_flags = [f"--batch_size={eval_batch_size}", f"--max_examples={max_examples}", f"--data_dir={data_dir}",
                  *shlex.split(evaluate_args)]
    family = model_type(base_model)
    model_label = os.path.basename(os.path.normpath(base_model))

    run_dirs = {label: os.path.join(output_dir, "eval", run_folder(model_label, label)) for label in labels}
    asked = {"dataset": datasets, "flags": eval_flags}  # no paths of OUTPUT_DIR in it: it may be moved
    if not all(eval_record(run_dirs[label], asked) for label in labels):
        benchmark_names(datasets, eval_flags)  # a misspelt set fails now, not after hours of training
    flags = {label: training_flags(label, base_model, data_path, bundled, family, overrides, finetune_args)
             for label in labels}
    if not all(os.path.isfile(os.path.join(output_dir, label, "run.json")) for label in labels):
        check_adapters(flags)

    # One sweep at a time in a folder: two would train the same adapters into the same folders.
    os.makedirs(output_dir, exist_ok=True)
    with folder_lock(output_dir, busy=f"another sweep is running in {output_dir}; wait for it, or choose another --output_dir"):
        # train and evaluate each adapter; each step is skipped when its files say it is done
        records, metrics = {}, {}
        for label in labels:
            adapter_dir = os.path.join(output_dir, label)
            if train(label, flags[label], adapter_dir):
                # predictions of earlier weights of this adapter would be scored as the new ones'
                shutil.rmtree(run_dirs[label], ignore_errors=True)
            records[label] = read_json(os.path.join(adapter_dir, "run.json"))
            metrics[label] = [read_json(p) for p in evaluate(label, model_label, adapter_dir, run_dirs[label], asked)]

        # tabulate and plot
        names, table = accuracy_by_adapter(metrics)
        tables = {"resources": resource_tables(records), "accuracy": accuracy_tables(names, table)}
        for stem, (md, csv_rows) in tables.items():
            write_text_atomic(os.path.join(output_dir, f"{stem}.md"), md)
            write_text_atomic(os.path.join(output_dir, f"{stem}.csv"), csv_rows)
            print(f"\n{md}", end="")
        plot_accuracy(os.path.join(output_dir, "accuracy.png"), names, table, f"{model_label}: accuracy")
        plot_loss(os.path.join(output_dir, "loss.png"), records, f"{model_label}: training loss")
        print(f"\nwritten to {output_dir}: resources.md/.csv, accuracy.md/.csv, accuracy.png, loss.png")


if __name__ == "__main__":
    run_cli(main, interrupted="what finished is kept; run the same command again to continue")
