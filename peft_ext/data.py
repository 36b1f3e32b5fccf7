"""Training data: reading records from files or the hub, and turning them into token ids and labels.

Supported inputs: a JSON list or JSONL file of `{instruction, input, output}` records (or ShareGPT
`conversations`); a directory holding `train.json` (its `test.json` is evaluate.py's); a `.txt` file of raw
text, chunked into `cutoff_len`-token blocks; a `datasets` hub id (its train split: records, or raw text in a
`text` column).
"""
import os

from datasets import Dataset

from peft_ext.errors import UsageError
from peft_ext.files import read_records, read_text
from peft_ext.prompts import Prompter, check_input, turn_role_and_text

IGNORE_INDEX = -100  # label of a token that carries no loss


def _check_records(records: list, path: str) -> None:
    if not records:
        raise UsageError(f"{path} holds no records; give a non-empty dataset")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UsageError(f"record {i} of {path} is a {type(r).__name__}, not an object")
        if r.get("conversations"):
            turns = r["conversations"]
            if not isinstance(turns, list) or not all(
                    isinstance(t, dict) and isinstance(turn_role_and_text(t)[1], str) for t in turns):
                raise UsageError(f"record {i} of {path}: 'conversations' must be a list of turns, each "
                                 "{from, value} or {role, content} with text as the value")
            continue
        missing = [k for k in ("instruction", "output") if k not in r]
        not_text = [k for k in ("instruction", "output") if k in r and not isinstance(r[k], str)]
        if missing or not_text:
            problem = f"lacks {' and '.join(map(repr, missing))}" if missing else f"has a non-text {' and '.join(map(repr, not_text))}"
            raise UsageError(
                f"record {i} of {path} {problem}; "
                "records need 'instruction' and 'output' strings (or ShareGPT 'conversations')"
            )
        check_input(r, f"record {i} of {path}")


def _records_dataset(path: str) -> Dataset:
    records = read_records(path)
    _check_records(records, path)
    with_conversations = any("conversations" in r for r in records)
    return Dataset.from_list([_training_row(r, with_conversations) for r in records])


def _training_row(record: dict, with_conversations: bool) -> dict:
    """The fields of a record that are trained on, the same in every row, so that records with extra or ragged
    keys still form one table."""
    row = {"conversations": record.get("conversations")} if with_conversations else {}
    return {**row, **_instruction_fields(record)}


def _instruction_fields(r: dict) -> dict:
    value = r.get("input")  # a number is a valid input (check_input), as text, to share one column with text
    return {"instruction": r.get("instruction") or "", "input": "" if value is None else str(value),
            "output": r.get("output") or ""}


def _is_raw_text(data: Dataset) -> bool:
    """Raw text: a `text` column and no records to fill a template with (a hub set may hold both, as
    tatsu-lab/alpaca does: its records are then what is trained on)."""
    return "text" in data.column_names and not {"instruction", "output", "conversations"} & set(data.column_names)


def training_file(data_path: str) -> str | None:
    """The local file that load_data reads for `data_path` (a directory's train.json), or None for a hub id."""
    path = os.path.expanduser(data_path)
    if os.path.isdir(path):
        return next((os.path.join(path, n) for n in ("train.json", "train.jsonl") if os.path.isfile(os.path.join(path, n))), None)
    return path if os.path.isfile(path) else None


def load_data(data_path: str) -> Dataset:
    """The training records, checked here, before any model is loaded. A directory's test.json is not read: it
    is a benchmark's test set for evaluate.py (whose records need no 'output'), never a validation set."""
    if not data_path:
        raise UsageError("--data_path is required: a JSON/JSONL file, a directory, a .txt file or a hub id")
    path = os.path.expanduser(data_path)
    if os.path.isdir(path):
        train = training_file(path)
        if train is None:
            raise UsageError(f"data directory {data_path!r} holds no train.json; add one or point at a file")
        return _records_dataset(train)
    if os.path.isfile(path):
        if path.endswith(".txt"):
            text = read_text(path)
            if not text.strip():
                raise UsageError(f"{data_path} is empty; give a text file with content")
            return Dataset.from_list([{"text": text}])
        return _records_dataset(path)
    if data_path.endswith((".json", ".jsonl", ".txt")) or data_path.startswith((".", "/", "~")):
        raise UsageError(f"data file {data_path!r} does not exist; check --data_path")
    return _hub_dataset(data_path)


def _hub_dataset(name: str) -> Dataset:
    from datasets import load_dataset

    try:
        data = load_dataset(name)
    except Exception as e:  # the hub raises many kinds; all mean "cannot get it"
        raise UsageError(f"cannot load dataset {name!r} from the hub: {str(e).splitlines()[0][:300]}") from None
    if "train" not in data:
        raise UsageError(f"dataset {name!r} has no 'train' split, only {', '.join(map(repr, data))}; save the split "
                         "to train on as a JSON file and give its path as --data_path")
    split = data["train"]
    if _is_raw_text(split):
        return split.select_columns(["text"])
    _check_records(split.select(range(min(len(split), 1000))).to_list(), name)
    with_conversations = "conversations" in split.column_names
    return split.map(lambda r: _training_row(r, with_conversations), remove_columns=split.column_names,
                     desc="reading records")


def split_validation(data: Dataset, val_set_size, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out `val_set_size` records: a count (>= 1) or a fraction (0 < f < 1); 0 holds none out."""
    if not val_set_size:
        return data, None
    if (isinstance(val_set_size, bool) or not isinstance(val_set_size, (int, float)) or val_set_size < 0
            or (val_set_size >= 1 and val_set_size != int(val_set_size))):
        raise UsageError(f"--val_set_size must be a count or a fraction in (0, 1), got {val_set_size!r}")
    if isinstance(val_set_size, float) and val_set_size < 1:
        size = max(1, round(len(data) * val_set_size))
    else:
        size = int(val_set_size)
    if size >= len(data):
        unit = "blocks of --cutoff_len tokens" if "input_ids" in data.column_names else "records"
        raise UsageError(
            f"--val_set_size {val_set_size} leaves no training data ({len(data)} {unit}); use a smaller one, or 0"
        )
    parts = data.train_test_split(test_size=size, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode(tokenizer, segments: list[tuple[str, bool]], cutoff_len: int, train_on_inputs: bool) -> dict:
    """Token ids, attention mask and labels of one example made of (text, is_answer) segments.

    The text is tokenized whole, as at inference. With `train_on_inputs=False`, a token is masked when
    it lies entirely inside a prompt segment (`_segment_spans`), so a token merged across the boundary stays
    trainable and the first answer token is never masked. EOS is appended when it fits within `cutoff_len`.
    """
    return _encode(tokenizer, segments, cutoff_len, train_on_inputs)[0]


def _encode(tokenizer, segments: list[tuple[str, bool]], cutoff_len: int, train_on_inputs: bool) -> tuple[dict, bool]:
    """`encode`'s example, and whether a response token (EOS included) lies within `cutoff_len`."""
    text = "".join(t for t, _ in segments)
    ids = tokenizer(text)["input_ids"]
    labels = list(ids)
    spans = _segment_spans(tokenizer, segments, text, ids)
    if train_on_inputs:  # only where the response starts matters: no prefix past it is tokenized
        response_start = next((start for start, end, is_answer in spans if is_answer and end > start), len(ids))
    else:
        response_start = len(ids)  # where EOS goes, when no answer has a token of its own
        for start, end, is_answer in spans:
            if not is_answer:
                labels[start:end] = [IGNORE_INDEX] * (end - start)
            elif end > start:
                response_start = min(response_start, start)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids, labels = ids + [eos], labels + [eos]
    ids, labels = ids[:cutoff_len], unpredicted_first(labels[:cutoff_len])
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, response_start < len(ids)


def _segment_spans(tokenizer, segments: list[tuple[str, bool]], text: str, ids: list[int]):
    """Each segment's tokens in `ids` (the whole `text` tokenized) as (start, end, is_answer): the prefix ending at
    each segment boundary is tokenized alone and compared with the whole, so that a token merged across a boundary
    belongs to the later segment."""
    start, boundary = 0, 0
    for seg_text, is_answer in segments:
        boundary += len(seg_text)
        end = len(ids) if boundary >= len(text) else _common_prefix(tokenizer(text[:boundary])["input_ids"], ids)
        end = max(end, start)
        yield start, end, is_answer
        start = end


def unpredicted_first(labels: list[int]) -> list[int]:
    """`labels` with the first masked: no token comes before it to predict it, so the loss never counts it, and
    the Trainer, which divides the loss by the labels it counts, leaves it out only for the model classes whose
    loss it knows (LlamaForCausalLM, not GPT2LMHeadModel, under transformers 5.23). Packed rows mask it too."""
    return [IGNORE_INDEX] + labels[1:] if labels else labels


def chunk_text(tokenizer, text: str, cutoff_len: int) -> list[dict]:
    """Raw text as consecutive `cutoff_len`-token blocks, every token trained on."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    blocks = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": unpredicted_first(b)} for b in blocks if len(b) > 1]


def training_sets(data: Dataset, val_set_size, seed: int, tokenizer, prompter: Prompter, cutoff_len: int,
                  train_on_inputs: bool) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None) as model inputs. Records are held out before they are tokenized; raw text,
    which is one record, as whole blocks of `cutoff_len` tokens once it is cut into them."""
    def encoded(part: Dataset) -> Dataset:
        return tokenize(part, tokenizer, prompter, cutoff_len, train_on_inputs)

    if _is_raw_text(data):
        return split_validation(encoded(data), val_set_size, seed)
    train, val = split_validation(data, val_set_size, seed)
    return encoded(train), encoded(val) if val is not None else None


def tokenize(data: Dataset, tokenizer, prompter: Prompter, cutoff_len: int, train_on_inputs: bool) -> Dataset:
    """The dataset as model inputs; examples with no response token within `cutoff_len` are dropped, with a note,
    whatever `train_on_inputs`: cut within its prompt, an example teaches no answer."""
    if _is_raw_text(data):
        rows = [block for text in data["text"] for block in chunk_text(tokenizer, text, cutoff_len)]
        return Dataset.from_list(rows)

    def encoded_record(record: dict) -> dict:
        example, has_response = _encode(tokenizer, prompter.record_segments(record), cutoff_len, train_on_inputs)
        return {**example, "has_response": has_response}

    encoded = data.map(encoded_record, remove_columns=data.column_names, desc="tokenizing")
    kept = encoded.filter(bool, input_columns="has_response", desc="dropping empty").remove_columns("has_response")
    if len(kept) < len(encoded):
        print(f"note: {len(encoded) - len(kept)} of {len(encoded)} examples are left out, with no response token to "
              f"learn from within --cutoff_len {cutoff_len}: their prompt fills it (a larger --cutoff_len keeps them)")
    return kept
