"""Scoring a model on benchmark sets, batched and resumable.

Per set, a folder OUTPUT/DATASET holds:
- `settings.json`: what made the predictions (model and adapter with a fingerprint of their weights,
  template, decoding, data file hash); a re-run with other settings, or after the weights under the same
  paths changed, is refused rather than mixed in;
- `predictions.jsonl`: one line per example (index, prompt, response, prediction, label, correct),
  appended and flushed as each example finishes, so an interrupted run resumes where it stopped; under
  torchrun each rank appends to `predictions.rankN.jsonl`, merged into predictions.jsonl at the end;
- `metrics.json`: written atomically once every example is scored.
"""
import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from tqdm import tqdm

from peft_ext import answers
from peft_ext.answers import Benchmark
from peft_ext.distributed import end_process_group
from peft_ext.errors import UsageError
from peft_ext.files import atomic_open, file_sha256, folder_lock, read_records, write_json_atomic
from peft_ext.generation import SharedPrefix, decoding_config, stream
from peft_ext.prompts import check_input, text_fields

PREDICTIONS = "predictions.jsonl"
SETTINGS = "settings.json"
METRICS = "metrics.json"
RESULTS = "results.csv"
RESULT_FIELDS = [
    "finished_at", "model", "adapter", "dataset", "accuracy", "correct", "n", "seconds", "examples_per_s",
    "num_beams", "temperature", "max_new_tokens", "batch_size", "answer_rule", "prompt_template", "dtype",
    "load_8bit", "load_4bit", "base_model", "lora_weights", "world_size",
]


@dataclass
class Task:
    benchmark: Benchmark
    path: str
    examples: list[dict]
    data_sha256: str  # of the file as its examples were read; every settings check compares it


# ---- which sets, from which files


def dataset_items(spec) -> list[str]:
    """`--dataset` as a list: fire gives a comma list as a tuple, or as one string."""
    items = spec if isinstance(spec, list | tuple) else str(spec).split(",")
    return [s for s in (str(i).strip() for i in items) if s]


def resolve_tasks(spec, data_dir: str, max_examples: int = 0, skip_missing: bool = False) -> tuple[list[Task], list[Benchmark]]:
    """The sets a `--dataset` names (names, suites, paths, comma lists) with their examples loaded and
    checked, and the known sets whose files are absent (only with `skip_missing`)."""
    items = dataset_items(spec)
    if not items:
        raise UsageError(f"--dataset is required: one of {', '.join(answers.known_names())}, a comma list, or a path")
    wanted = []  # (benchmark or None for a file we do not know, path)
    for item in items:
        if "/" in item or os.sep in item or item.endswith(".json"):
            wanted.append((None, os.path.join(item, "test.json") if os.path.isdir(item) else item))
        else:
            for name in answers.SUITES.get(item.lower(), [item]):
                benchmark = answers.get(name)
                wanted.append((benchmark, os.path.join(data_dir, benchmark.name, "test.json")))
    tasks, missing, seen = [], [], set()
    for benchmark, path in wanted:
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        if os.path.isfile(path):
            tasks.append(load_task(path, benchmark, max_examples))
        elif benchmark and skip_missing:
            missing.append(benchmark)
        else:
            where = f"--data_dir {data_dir!r} has no {benchmark.name}/test.json" if benchmark else f"{path} does not exist"
            raise UsageError(
                f"{where}; data/README.md says how to fetch it"
                + (", point --data_dir at the folder that holds it, or pass --skip_missing True" if benchmark else "")
            )
    by_name = {}
    for task in tasks:  # a set's name is its folder and its key in the tables
        other = by_name.setdefault(task.benchmark.name.lower(), task)
        if other is not task:
            raise UsageError(f"{other.path} and {task.path} would both be scored as {task.benchmark.name!r}, into one "
                             "folder; rename one (a file's name, or a test.json's folder, names its set) or score them "
                             "in separate commands with separate --output_dir")
    return tasks, missing


def load_task(path: str, benchmark: Benchmark | None, max_examples: int = 0) -> Task:
    records = read_records(path)
    if not records:
        raise UsageError(f"{path} holds no records; it should hold {{instruction, input, answer}} records")
    records = records[:max_examples] if max_examples > 0 else records
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise UsageError(f"{path}: record {i} has no 'instruction' text; each record needs instruction and answer")
        if "answer" not in record:
            raise UsageError(f"{path}: record {i} has no 'answer'; each record needs instruction and answer")
        check_input(record, f"{path}: record {i}")
    if benchmark is None:
        folder, stem = os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.splitext(os.path.basename(path))[0]
        name = folder if stem == "test" else stem
        benchmark = answers.find(name) or answers.infer(name, [r["answer"] for r in records])
    for i, record in enumerate(records):
        problem = benchmark.check_answer(record["answer"])
        if problem:
            raise UsageError(f"{path}: record {i}: {problem}, which a {benchmark.kind} set cannot score")
    return Task(benchmark, path, records, file_sha256(path))


# ---- files


def read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_predictions(path: str) -> list[dict]:
    """The complete lines of a predictions file; a last line cut short by a crash is left out."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:  # a bad line with more after it: not a crash, a damaged file
                raise UsageError(f"{path} line {number + 1} is not JSON; delete the file or pass --overwrite") from None
    return records


def drop_partial_line(path: str) -> None:
    """Cut a last line without its newline (a crash mid-write) so that appends start on a fresh line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# ---- ranks under torchrun


class Ranks:
    """This process's place among torchrun's workers (rank 0 of 1 without torchrun)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1 and not torch.distributed.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1:
            end_process_group()


# ---- one model over many sets


@dataclass
class Evaluation:
    """One model's run: where its records go, how it decodes, how answers are read."""

    run_dir: str
    identity: dict  # what decides the outputs besides decoding: model, adapter, template, precision
    num_beams: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 0  # 0: each set's default
    answer_rule: str = "strict"
    batch_size: int = 16
    seed: int = 42

    def task_dir(self, task: Task) -> str:
        return os.path.join(self.run_dir, task.benchmark.name)

    def settings(self, task: Task) -> dict:
        sampling = self.temperature > 0
        return {
            **self.identity,
            "dataset": task.benchmark.name,
            "data_sha256": task.data_sha256,
            "num_beams": self.num_beams,
            "temperature": self.temperature,
            "seed": self.seed if sampling else None,
            "max_new_tokens": self.max_new_tokens or task.benchmark.max_new_tokens,
            "answer_rule": self.answer_rule if task.benchmark.kind == "letter" else None,
        }

    def check_settings(self, task: Task) -> list[dict]:
        """Refuse to add to predictions made with other settings; a run that stopped before its first prediction
        (its settings.json written, nothing else) is simply started again. Returns the saved predictions."""
        folder = self.task_dir(task)
        predictions = self._all_predictions(folder) if os.path.isdir(folder) else []
        saved = read_json(os.path.join(folder, SETTINGS))
        if saved is None or not predictions:
            return predictions
        if isinstance(saved.get("prompt_template"), dict):  # earlier versions kept its name and description too
            saved["prompt_template"] = text_fields(saved["prompt_template"])
        current = json.loads(json.dumps(self.settings(task)))
        # A setting that an earlier version did not record is not taken as changed. The answer rule reads the saved
        # responses again (`rescored`): changing it needs no new predictions.
        changed = {k for k in current if k in saved and saved[k] != current[k]} - {"answer_rule"}
        if "lora_weights" in changed and saved.get("lora_weights_sha256") == current["lora_weights_sha256"]:
            changed.discard("lora_weights")  # the same adapter, moved or reached by another path
        if {"base_model", "lora_weights"} & changed:
            adapter = f"with the adapter {saved['lora_weights']}" if saved.get("lora_weights") else "alone"
            made_by = f"the base model {saved['base_model']} {adapter}"
            raise UsageError(f"{folder} holds the predictions of {made_by}: give this run a folder of its own with "
                             "--adapter LABEL (or --model LABEL), or choose another --output_dir")
        if changed:
            why = "; the model's weight files changed since" if {"base_model_files", "lora_weights_sha256"} & changed else ""
            raise UsageError(
                f"{folder} holds predictions made with other settings ({', '.join(sorted(changed))} differ{why}); "
                "pass --overwrite True to discard them, or choose another --output_dir"
            )
        return predictions

    def rescored(self, task: Task, record: dict) -> dict:
        """A saved prediction read again under this run's answer rule, on which only a letter set's answer depends."""
        if task.benchmark.kind != "letter":
            return record
        prediction = task.benchmark.extract(record["response"], self.answer_rule)
        return {**record, "prediction": prediction, "correct": task.benchmark.is_correct(prediction, record["label"])}

    def finished(self, task: Task) -> dict | None:
        """The metrics of this set if it is done with these settings, without the model: as saved, or, when every
        example has its prediction but metrics.json is not about these examples (`--max_examples N` after a longer
        or a shorter run, another --answer_rule, or a stop just before it was written), scored from the predictions
        and marked with "scored_from", the number of predictions saved; `save_scored` then writes them."""
        predictions = self.check_settings(task)
        metrics = read_json(os.path.join(self.task_dir(task), METRICS))
        rule = self.settings(task)["answer_rule"]
        if metrics and metrics.get("n") == len(task.examples) and metrics.get("settings", {}).get("answer_rule") == rule:
            return metrics
        by_index = {r["index"]: self.rescored(task, r) for r in predictions}
        if by_index and all(i in by_index for i in range(len(task.examples))):
            metrics = self._metrics(task, by_index, generated=0, resumed=len(task.examples), seconds=0.0, world=1)
            return {**metrics, "scored_from": len(by_index)}
        return None

    def save_scored(self, task: Task, scored: dict, world: int) -> dict:
        """Write the metrics of a set that `finished` scored from its predictions (`scored`; rank 0, once every
        rank has read them): the predictions of a longer run stay in predictions.jsonl, metrics.json is about these."""
        return {**self._finish(task, 0, len(task.examples), 0.0, world), "scored_from": scored["scored_from"]}

    def discard(self, task: Task) -> None:
        shutil.rmtree(self.task_dir(task), ignore_errors=True)

    def run(self, task: Task, model, tokenizer, prompter, ranks: Ranks) -> dict | None:
        """Generate and score what is not done yet; rank 0 returns the metrics, other ranks None."""
        folder, benchmark = self.task_dir(task), task.benchmark
        settings = self.settings(task)
        if ranks.main:
            os.makedirs(folder, exist_ok=True)
            write_json_atomic(os.path.join(folder, SETTINGS), settings)
        ranks.barrier()
        done = {r["index"] for r in self._all_predictions(folder)}
        ranks.barrier()  # every rank has read the files before any rank appends to them
        prompts = [prompter.prompt(r["instruction"], r.get("input")) for r in task.examples]
        rows = tokenizer(prompts)["input_ids"]
        # Ranks take turns down the length order, so each gets as much reading and decoding; `stream` decodes them
        # longest first, so memory runs out at once if at all.
        pending = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: -len(rows[i]))
        mine = pending[ranks.rank :: ranks.world]
        stop = tuple(prompter.template.get("stop", [])) + (prompter.template["response_split"],)
        config = decoding_config(model, tokenizer, settings["max_new_tokens"], self.num_beams, self.temperature, stop)
        torch.manual_seed(self.seed + ranks.rank)
        log = os.path.join(folder, PREDICTIONS if ranks.world == 1 else f"predictions.rank{ranks.rank}.jsonl")
        drop_partial_line(log)

        mine_rows = [rows[i] for i in mine]
        prefix = SharedPrefix(mine_rows) if mine else None

        start, correct, scored, synced = time.perf_counter(), 0, 0, time.monotonic()
        desc = benchmark.name if ranks.world == 1 else f"{benchmark.name} (rank 0's share)"
        bar = tqdm(total=len(mine), desc=desc, disable=not ranks.main, dynamic_ncols=True)
        with bar, open(log, "a") as out:  # the bar closes on Ctrl-C too, so it is not redrawn after the message
            for finished in stream_backing_off(model, tokenizer, mine_rows, config, self.batch_size, prefix, benchmark.name):
                for j, response in finished:
                    i = mine[j]
                    label = str(task.examples[i]["answer"]).strip()
                    prediction = benchmark.extract(response, self.answer_rule)
                    hit = benchmark.is_correct(prediction, label)
                    record = dict(index=i, prompt=prompts[i], response=response, prediction=prediction, label=label, correct=hit)
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    correct, scored = correct + hit, scored + 1
                out.flush()  # a killed run keeps every finished prediction; the disk gets them about once a second
                if time.monotonic() - synced > 1:
                    os.fsync(out.fileno())
                    synced = time.monotonic()
                bar.update(len(finished))
                bar.set_postfix(acc=f"{correct / scored:.1%}")
            os.fsync(out.fileno())
        ranks.barrier()
        if not ranks.main:
            return None
        resumed = sum(i < len(task.examples) for i in done)  # not the saved predictions of a longer run
        return self._finish(task, len(pending), resumed, time.perf_counter() - start, ranks.world)

    def _all_predictions(self, folder: str) -> list[dict]:
        files = [PREDICTIONS] + sorted(f for f in os.listdir(folder) if f.startswith("predictions.rank"))
        return [r for name in files for r in read_predictions(os.path.join(folder, name))]

    def _finish(self, task: Task, generated: int, resumed: int, seconds: float, world: int) -> dict:
        """Merge the rank files into one predictions.jsonl in data order; write metrics.json."""
        folder = self.task_dir(task)
        by_index = {r["index"]: self.rescored(task, r) for r in self._all_predictions(folder)}
        merged = [by_index[i] for i in sorted(by_index)]
        with atomic_open(os.path.join(folder, PREDICTIONS)) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in merged)
        for name in os.listdir(folder):
            if name.startswith("predictions.rank"):
                os.remove(os.path.join(folder, name))
        metrics = self._metrics(task, by_index, generated, resumed, seconds, world)
        write_json_atomic(os.path.join(folder, METRICS), metrics)
        return metrics

    def _metrics(self, task: Task, by_index: dict[int, dict], generated: int, resumed: int, seconds: float, world: int) -> dict:
        """The scores of the task's examples, from their predictions by index."""
        benchmark = task.benchmark
        scored = [by_index[i] for i in range(len(task.examples))]
        n, correct = len(scored), sum(r["correct"] for r in scored)
        metrics = {
            "dataset": benchmark.name,
            "file": os.path.abspath(task.path),
            "kind": benchmark.kind,
            "accuracy": correct / n,
            "correct": correct,
            "n": n,
            "no_answer": sum(r["prediction"] is None for r in scored),
            "seconds": round(seconds, 2),
            "examples_per_s": round(generated / seconds, 3) if generated else None,
            "generated": generated,
            "resumed": resumed,
            "batch_size": self.batch_size,
            "world_size": world,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": self.settings(task),
        }
        if benchmark.kind == "letter":  # the extraction audit: what each rule makes of the same responses
            metrics["accuracy_by_rule"] = {
                rule: sum(benchmark.is_correct(benchmark.extract(r["response"], rule), r["label"]) for r in scored) / n
                for rule in answers.ANSWER_RULES
            }
        return metrics


def stream_backing_off(model, tokenizer, rows: list[list[int]], config, batch_size: int, prefix: SharedPrefix | None,
                       name: str) -> Iterator[list[tuple[int, str]]]:
    """`stream`, except that where the GPU runs out of memory, the prompts not finished yet start again at half
    the batch size, instead of the run being lost."""
    left = list(range(len(rows)))
    while left:
        done = set()
        try:
            for finished in stream(model, tokenizer, [rows[i] for i in left], config, batch_size, prefix):
                finished = [(left[j], response) for j, response in finished]
                done.update(i for i, _ in finished)
                yield finished
            return
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise UsageError("out of GPU memory at batch size 1: load the model with --load_4bit or --load_8bit, "
                                 "or lower --max_new_tokens") from None
            batch_size //= 2
            left = [i for i in left if i not in done]
            tqdm.write(f"{name}: out of GPU memory; going on at --batch_size {batch_size}", file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # here, once the failed attempt's tensors are gone with its exception


# ---- results tables


def append_result(output_dir: str, result: dict, model: str, adapter: str, prompt_template: str) -> str:
    """Add one finished set (its metrics) to OUTPUT/results.csv, created with its header, unless the same row is
    there already (a set finished by a run stopped before it wrote its row gets it from the next); returns the path. A file
    from an earlier version first gets the columns it lacks, at its end (its rows and any columns of its own kept).
    Runs that finish at the same moment take turns (a lock on the folder), so none writes a second header."""
    row = {**result, **result["settings"], "model": model, "adapter": adapter,
           "accuracy": round(100 * result["accuracy"], 2), "prompt_template": prompt_template}
    path = os.path.join(output_dir, RESULTS)
    with folder_lock(output_dir):
        fields = RESULT_FIELDS
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header, rows = list(reader.fieldnames or []), list(reader)
            cells = ["" if row.get(name) is None else str(row[name]) for name in RESULT_FIELDS]
            if any([old.get(name) or "" for name in RESULT_FIELDS] == cells for old in rows):
                return path
            fields = header + [name for name in RESULT_FIELDS if name not in header]
            if fields != header:
                with atomic_open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(rows)
        new = not os.path.isfile(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
    return path


def paper_table(model: str, adapter: str, suite: str, accuracy: dict[str, float]) -> str:
    """The paper's Markdown table for one suite: a column per set (percent) plus the average.
    A set with no result shows as a dash and the average says over how many sets it runs."""
    benchmarks = [answers.get(name) for name in answers.SUITES[suite]]
    cells = [f"{100 * accuracy[b.name]:.1f}" if b.name in accuracy else "–" for b in benchmarks]
    scores = [accuracy[b.name] for b in benchmarks if b.name in accuracy]
    average = f"{100 * sum(scores) / len(scores):.1f}" if scores else "–"
    average_header = "Avg" if len(scores) == len(benchmarks) else f"Avg ({len(scores)} of {len(benchmarks)})"
    header = ["Model", "Adapter", *(b.column for b in benchmarks), average_header]
    lines = [header, ["---"] * len(header), [model, adapter, *cells, average]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"
