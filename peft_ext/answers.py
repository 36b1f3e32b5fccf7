"""The one table of benchmark sets: each set's kind, how an answer is read from a response, and its
decoding defaults. A new set is a new row of BENCHMARKS; nothing else changes.

Kinds, as scored by the LLM-Adapters paper (see `../shared/reference/adapters.md`, "Evaluation"):
- `number`: the LAST number in the response, thousands commas removed, read with the reference's pattern
  (optional minus, digits, optional point and digits); correct when |prediction - answer| <= 0.001.
  Like the reference, "1/2" reads as 2 and the "-3" of "5-3" as minus three.
- `letter` (AQuA's options A-E), by one of two rules:
  `strict` (default): the last "answer is (X)" / "answer is X"; failing that, the last option letter
  standing alone ("(C)", "C)", "C." or a final "C"), never the article "A" of "A train ...";
  `paper`: the first capital A-E anywhere in the response, the reference's rule (an "A" or an "Each"
  matches, which is why it scores lower than the model deserves).
- `label` (commonsense sets): the first occurrence of one of the set's label words, case-sensitive, as in
  the reference (`true|false`, `solution1|solution2`, `answer1`...`answer5`, ...).
"""
import re
from dataclasses import dataclass

from peft_ext.errors import UsageError

ANSWER_RULES = ("strict", "paper")
NUMBER = re.compile(r"-?[0-9]+\.?[0-9]*")
TOLERANCE = 0.001
# "the answer is (C)", "Answer is: C because ..."; the letter must not start a word, nor be the article "A" of
# "answer is A train ..." (but "answer is A because ..." is an answer).
ANSWER_IS = re.compile(r"(?i:answer\s+is)\s*:?\s*\(?([B-E]|A(?!\s+(?!(?:because|since|as|and|or|but|so|which)\b)[a-z]))"
                       r"(?![A-Za-z])")
# An option letter standing alone: "(C)", "C)", or "C" before punctuation or the end of the text.
OPTION_LETTER = re.compile(r"\(([A-E])\)|(?<![A-Za-z])([A-E])(?:\)|(?=[.,;:!?]|\s*$))")
FIRST_CAPITAL = re.compile(r"[A-E]")


@dataclass(frozen=True)
class Benchmark:
    name: str  # the seed's spelling, and the set's folder under --data_dir
    column: str  # its header in the paper's tables
    kind: str  # "number", "letter" or "label"
    labels: tuple[str, ...] = ()  # a "label" set's answer words, in the reference's pattern order
    max_new_tokens: int = 256  # the reference's budget: 256 for math, 32 for commonsense

    def extract(self, response: str, rule: str = "strict"):
        """The answer a response gives (a float, a letter or a label word), or None if it gives none."""
        if self.kind == "number":
            return last_number(response)
        if self.kind == "letter":
            return option_letter(response, rule)
        return first_label(response, self.labels)

    def is_correct(self, prediction, answer: str) -> bool:
        if prediction is None:
            return False
        if self.kind == "number":
            return abs(prediction - as_number(answer)) <= TOLERANCE
        return prediction == answer.strip()

    def check_answer(self, answer) -> str | None:
        """Why a record's `answer` cannot be scored by this set's kind, or None when it can."""
        if not isinstance(answer, str | int | float) or isinstance(answer, bool):
            return f"answer {answer!r} is not a string or number"
        if not str(answer).strip():
            return "its answer is empty"
        if self.kind == "number":
            try:
                as_number(answer)
            except ValueError:
                return f"answer {answer!r} is not a number"
        return None


def as_number(answer) -> float:
    """A number answer of a data file, "1,000" included (a response's number is read the same way)."""
    return float(str(answer).replace(",", ""))


def last_number(response: str) -> float | None:
    matches = NUMBER.findall(response.replace(",", ""))
    return float(matches[-1]) if matches else None


def option_letter(response: str, rule: str = "strict") -> str | None:
    if rule == "paper":
        match = FIRST_CAPITAL.search(response)
        return match.group(0) if match else None
    stated = ANSWER_IS.findall(response)
    if stated:
        return stated[-1]
    letters = [a or b for a, b in OPTION_LETTER.findall(response)]
    return letters[-1] if letters else None


def first_label(response: str, labels: tuple[str, ...]) -> str | None:
    match = re.search("|".join(map(re.escape, labels)), response)
    return match.group(0) if match else None


def _numbered(word: str, count: int) -> tuple[str, ...]:
    return tuple(f"{word}{i}" for i in range(1, count + 1))


BENCHMARKS = [
    Benchmark("AddSub", "AddSub", "number"),
    Benchmark("MultiArith", "MultiArith", "number"),
    Benchmark("SingleEq", "SingleEq", "number"),
    Benchmark("gsm8k", "GSM8K", "number"),
    Benchmark("AQuA", "AQuA", "letter"),
    Benchmark("SVAMP", "SVAMP", "number"),
    Benchmark("mawps", "MAWPS", "number"),
    # Ours: the held-out set of the bundled offline default (data/synth_math.py made it).
    Benchmark("synth_math", "SynthMath", "number"),
    Benchmark("boolq", "BoolQ", "label", ("true", "false"), 32),
    Benchmark("piqa", "PIQA", "label", _numbered("solution", 2), 32),
    # The reference matches answer1-answer5 for SIQA too, though it has three options.
    Benchmark("social_i_qa", "SIQA", "label", _numbered("answer", 5), 32),
    Benchmark("hellaswag", "HellaSwag", "label", _numbered("ending", 4), 32),
    Benchmark("winogrande", "WinoGrande", "label", _numbered("option", 2), 32),
    Benchmark("ARC-Easy", "ARC-e", "label", _numbered("answer", 5), 32),
    Benchmark("ARC-Challenge", "ARC-c", "label", _numbered("answer", 5), 32),
    Benchmark("openbookqa", "OBQA", "label", _numbered("answer", 5), 32),
]

# The paper's two tables, in its column order. MAWPS is SIBO's addition to the math table.
SUITES = {
    "math": ["AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "SVAMP", "mawps"],
    "commonsense": ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"],
}


def _key(name: str) -> str:
    """Spellings compare without case or punctuation: 'ARC-e' = 'arc_e', 'GSM8K' = 'gsm8k'."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


_BY_KEY = {_key(n): b for b in BENCHMARKS for n in (b.name, b.column)}


def known_names() -> list[str]:
    return [b.name for b in BENCHMARKS] + list(SUITES)


def find(name: str) -> Benchmark | None:
    return _BY_KEY.get(_key(name))


def get(name: str) -> Benchmark:
    benchmark = find(name)
    if benchmark is None:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(known_names())}, or give a path to a test.json")
    return benchmark


def infer(name: str, answers: list) -> Benchmark:
    """The row of a set we do not know, from its answers: numbers, option letters A-E, or label words."""
    def is_number(value) -> bool:
        try:
            as_number(value)
            return True
        except (TypeError, ValueError):
            return False

    if all(is_number(a) for a in answers):
        return Benchmark(name, name, "number")
    if all(str(a).strip() in ("A", "B", "C", "D", "E") for a in answers):
        return Benchmark(name, name, "letter")
    # Longest first, so that a label that begins another ("answer1", "answer10") never shadows it.
    labels = sorted({str(a).strip() for a in answers}, key=lambda label: (-len(label), label))
    return Benchmark(name, name, "label", tuple(labels), 32)


def check_rule(rule: str) -> str:
    rule = str(rule).strip().lower()
    if rule not in ANSWER_RULES:
        raise UsageError(f"unknown --answer_rule {rule!r}; choose 'strict' (default) or 'paper' (the reference's first capital A-E)")
    return rule
