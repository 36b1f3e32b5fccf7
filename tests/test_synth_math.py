"""The synthetic word-problem generator and the bundled data/synth_math sets it made."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from data import synth_math

DATA_DIR = os.path.join(ROOT, "data", "synth_math")
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
NUMBER = re.compile(r"\d+")


def committed(split: str) -> list:
    with open(os.path.join(DATA_DIR, f"{split}.json"), encoding="utf-8") as f:
        return json.load(f)


def check_solution(record: dict) -> None:
    """Recompute the answer from the solution text alone, and check that it uses the question's numbers.

    Every step is `a op b = c`: c must be right, a and b must be numbers of the question or results of
    earlier steps, every number of the question must be used, and the last result is the answer.
    """
    question, solution, answer = record["instruction"], record["output"], record["answer"]
    steps = EQUATION.findall(solution)
    assert 1 <= len(steps) <= 3, solution
    known = set(NUMBER.findall(question))
    used = set()
    result = None
    for a, op, b, c in steps:
        assert a in known and b in known, f"{a} {op} {b} uses a number from nowhere: {record}"
        x, y, result = int(a), int(b), int(c)
        if op == "+":
            assert x + y == result, record
        elif op == "-":
            assert x - y == result, record
        elif op == "*":
            assert x * y == result, record
        else:
            assert y != 0 and y * result == x, record  # exact division only
        used.update((a, b))
        known.add(c)
    assert set(NUMBER.findall(question)) <= used, f"a number of the question is never used: {record}"
    assert result >= 0
    assert solution.endswith(f"The answer is {result}."), solution
    assert answer == str(result)


def check_record_format(record: dict) -> None:
    assert set(record) == {"instruction", "input", "output", "answer"}
    assert record["input"] == ""
    assert record["instruction"].endswith("?")
    float(record["answer"])  # evaluation reads answers as numbers


@pytest.mark.parametrize("split", ["train", "test"])
def test_committed_problems_are_correct(split):
    records = committed(split)
    for record in records:
        check_record_format(record)
        check_solution(record)


def test_fresh_problems_are_correct_and_every_kind_occurs():
    records = synth_math.generate(3000, seed=12345)
    for record in records:
        check_record_format(record)
        check_solution(record)
    operation_counts = {len(EQUATION.findall(r["output"])) for r in records}
    assert operation_counts == {1, 2, 3}


def test_every_problem_maker_is_correct():
    rng = random.Random(7)
    for make in synth_math.PROBLEM_MAKERS:
        for _ in range(200):
            question, solution, answer = make(rng)
            check_solution({"instruction": question, "output": solution.text(answer), "answer": str(answer)})


def test_generation_is_deterministic_from_the_seed():
    assert synth_math.generate(200, seed=3) == synth_math.generate(200, seed=3)
    assert synth_math.generate(200, seed=3) != synth_math.generate(200, seed=4)
    assert synth_math.make_splits(100, 20, seed=5) == synth_math.make_splits(100, 20, seed=5)


def test_no_duplicate_questions_within_or_between_splits():
    train = [r["instruction"] for r in committed("train")]
    test = [r["instruction"] for r in committed("test")]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_generate_skips_excluded_questions():
    first = synth_math.generate(50, seed=9)
    excluded = {r["instruction"] for r in first[:25]}
    again = synth_math.generate(50, seed=9, exclude=excluded)
    assert not excluded & {r["instruction"] for r in again}


def test_committed_files_are_what_the_generator_writes(tmp_path):
    """Byte for byte, in a fresh process (so no state of this one, such as string hashing, matters)."""
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "data", "synth_math.py"), "--out_dir", str(tmp_path)],
        check=True, capture_output=True,
    )
    for split in ("train", "test"):
        with open(os.path.join(DATA_DIR, f"{split}.json"), "rb") as a, open(tmp_path / f"{split}.json", "rb") as b:
            assert a.read() == b.read(), f"data/synth_math/{split}.json differs: rerun python data/synth_math.py"
    assert len(committed("train")) == synth_math.TRAIN_SIZE
    assert len(committed("test")) == synth_math.TEST_SIZE


def test_training_loader_reads_the_bundled_directory():
    from peft_ext.data import load_data

    train = load_data(DATA_DIR)  # its test.json is evaluate.py's
    assert len(train) == synth_math.TRAIN_SIZE
    assert train[0]["output"].endswith(".")
