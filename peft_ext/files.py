"""Reading record files; writing results so that an interruption never leaves a half-written file behind, and
naming their folders."""
import contextlib
import hashlib
import json
import os
import re
import tempfile

try:
    import fcntl
except ImportError:  # Windows: no locks, so two runs that finish at once may interleave
    fcntl = None

from peft_ext.errors import UsageError

INCOMPLETE = ".incomplete"  # in a folder being written, removed once it is whole: a stop in between leaves it


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical(path: str) -> str:
    """A local path made absolute (so that a run resumes from another working directory); a hub id as is."""
    return os.path.realpath(path) if os.path.exists(path) else path


def check_writable(folder: str, flag: str = "--output_dir") -> None:
    """Refuse an output folder that cannot be written (a read-only disk, another user's folder) before any long
    work, without creating anything: the folder if it exists, else the nearest folder above it."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {folder!r} cannot be made: {existing} is a file; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder!r} cannot be written ({existing} is read-only or not yours); choose another {flag}")


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors write one) is dropped
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None


def read_records(path: str) -> list:
    """The records of a data file: a JSON list (or {"data": [...]}, or a single record), or JSON Lines, which a
    `.jsonl` file always is (a one-line JSON Lines file is also valid JSON: one object, not a list)."""
    text = read_text(path)
    if path.endswith(".jsonl"):
        data = _json_lines(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            data = _json_lines(path, text, e)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    elif isinstance(data, dict) and ("instruction" in data or "conversations" in data):
        data = [data]
    if not isinstance(data, list):
        raise UsageError(f"{path} must hold a list of records, found a JSON {type(data).__name__}")
    return data


def _json_lines(path: str, text: str, whole_error: json.JSONDecodeError | None = None) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                # once a line has been read as a record, the file is JSON Lines: its bad line is the one to name
                detail = whole_error if whole_error and not records else f"line {number}: {e}"
                raise UsageError(f"{path} is neither JSON nor JSON Lines ({detail}); fix the file") from None
    return records


def run_folder(model_label: str, adapter_label: str) -> str:
    """The folder name of an evaluation run, MODEL-ADAPTER, safe whatever the labels hold: a hub id as a label
    (`meta-llama/Llama-2-7b-hf`) or `..` must not make folders elsewhere, so characters other than letters,
    digits and `._+-` become `_`, and so does a leading dot."""
    name = re.sub(r"[^\w.+-]", "_", f"{model_label}-{adapter_label}")
    return "_" + name[1:] if name.startswith(".") else name


@contextlib.contextmanager
def folder_lock(folder: str, busy: str = ""):
    """An exclusive lock on `folder` while the block runs (POSIX; none on Windows): waited for, or with `busy`,
    refused at once with that message."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        if fcntl:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
            except BlockingIOError:
                raise UsageError(busy) from None
        yield
    finally:
        os.close(handle)  # and the lock with it


def make_readable(folder: str) -> None:
    """Give `folder` and its files the modes a plain open() would (the umask's): mkdtemp, mkstemp and safetensors
    make them private, where what a run saves is meant to be read by others (a serving account, a colleague)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_args):
    """A file to write `path` through: a temporary file beside it, renamed into place once the block succeeds."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def write_text_atomic(path: str, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
