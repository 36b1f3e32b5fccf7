"""Prompt templates: `templates/NAME.json` files turned into training and inference text."""
import json
import os
import string
from pathlib import Path

from peft_ext.errors import UsageError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
TEMPLATE_FILE = "prompt_template.json"  # the copy kept in every checkpoint directory
REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")
# The placeholders each text holds: any other would fail only when the first example is formatted, and one left out
# would leave out what it stands for (every prompt the same, or no input) without a word.
PLACEHOLDERS = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"},
                "chat_user": {"message"}, "chat_assistant": {"message"}, "chat_system": set(),
                "chat_system_message": {"message"}, "output": {"output"}, "response_split": set()}
KNOWN_KEYS = {*PLACEHOLDERS, "stop", "name", "description"}


def text_fields(template: dict) -> dict:
    """What of a template decides the text a model sees: all of it but its name and description."""
    return {key: value for key, value in template.items() if key not in ("name", "description")}


def check_input(record: dict, where: str) -> None:
    """Refuse an 'input' that a prompt cannot hold as text: a list, an object, true or false."""
    value = record.get("input")
    if not isinstance(value, str | int | float | None) or isinstance(value, bool):
        raise UsageError(f"{where} has an 'input' that is a {type(value).__name__}, not text; give the input as a string")


def turn_role_and_text(turn: dict) -> tuple:
    """A ShareGPT turn's role and text, of {from, value} or {role, content}: the first of each pair that is not
    None, since a table of records that mix the two spellings gives every turn all four keys."""
    return tuple(next((turn[k] for k in pair if turn.get(k) is not None), None)
                 for pair in (("from", "role"), ("value", "content")))


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def _check_text(name: str, key: str, text, placeholders: set[str]) -> None:
    if not isinstance(text, str):
        raise UsageError(f"prompt template {name!r}: {key!r} must be a string, got {type(text).__name__}")
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as e:
        raise UsageError(f"prompt template {name!r}: {key!r} is not a valid format string ({e}); "
                         "write {{ and }} for literal braces") from None
    if used - placeholders:
        may = ", ".join("{" + f + "}" for f in sorted(placeholders)) or "no placeholder"
        raise UsageError(f"prompt template {name!r}: {key!r} uses {sorted(used - placeholders)}, but may hold only {may} "
                         "(write {{ and }} for literal braces)")
    if placeholders - used:
        lacking = ", ".join("{" + f + "}" for f in sorted(placeholders - used))
        raise UsageError(f"prompt template {name!r}: {key!r} lacks {lacking}, so what it stands for would be left out "
                         "of every text; add it")


class Prompter:
    """Fills one template; `segments` says which parts of a text are prompt and which are answer."""

    def __init__(self, template: dict, name: str = "custom"):
        missing = [k for k in REQUIRED_KEYS if k not in template]
        if missing:
            raise UsageError(f"prompt template {name!r} lacks the key(s) {missing}; see templates/README.md")
        unknown = sorted(set(template) - KNOWN_KEYS)
        if unknown:  # a misspelt key (`stops`) would be ignored
            raise UsageError(f"prompt template {name!r} has the unknown key(s) {unknown}; the keys are "
                             f"{', '.join(sorted(KNOWN_KEYS))} (see templates/README.md)")
        for key, placeholders in PLACEHOLDERS.items():
            if key in template:
                _check_text(name, key, template[key], placeholders)
        stop = template.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise UsageError(f"prompt template {name!r}: 'stop' must be a list of non-empty strings")
        if not template["response_split"]:
            raise UsageError(f"prompt template {name!r}: 'response_split' must not be empty")
        self.template = template
        self.name = name

    @classmethod
    def load(cls, name_or_path: str = "alpaca") -> "Prompter":
        """A template by name (templates/NAME.json), by path, or from a checkpoint directory."""
        path = Path(name_or_path)
        if path.is_dir():
            path = path / TEMPLATE_FILE
        elif not name_or_path.endswith(".json"):
            path = TEMPLATES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise UsageError(
                f"unknown prompt template {name_or_path!r}; choose one of {available_templates()} "
                "or give the path of a template JSON file"
            )
        try:
            template = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"prompt template {path} is not valid UTF-8 JSON ({e}); fix the file") from None
        if not isinstance(template, dict):
            raise UsageError(f"prompt template {path} must be a JSON object with {list(REQUIRED_KEYS)}; fix the file")
        return cls(template, template.get("name", path.stem))

    def save(self, directory: str) -> None:
        target = os.path.join(directory, TEMPLATE_FILE)
        with open(target, "w") as f:
            json.dump({"name": self.name, **self.template}, f, indent=2, ensure_ascii=False)

    def prompt(self, instruction: str, input: str | None = None) -> str:
        """The text the model sees before its response."""
        if input:
            return self.template["prompt_input"].format(instruction=instruction, input=input)
        return self.template["prompt_no_input"].format(instruction=instruction)

    def record_segments(self, record: dict) -> list[tuple[str, bool]]:
        """A training record as (text, is_answer) pieces: the prompt, then the output (as the template's `output`
        writes it: Vicuna's after a space, which the answer's first token takes, as at inference)."""
        if "conversations" in record and record["conversations"]:
            return self.conversation_segments(record["conversations"])
        prompt = self.prompt(record["instruction"], record.get("input"))
        return [(prompt, False), (self.template.get("output", "{output}").format(output=record["output"]), True)]

    def conversation_segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        """A ShareGPT conversation ([{from: human|gpt|system, value}] or {role, content}) as pieces."""
        for key in ("chat_user", "chat_assistant"):
            if key not in self.template:
                raise UsageError(
                    f"prompt template {self.name!r} has no {key!r} and cannot render conversations; "
                    "use --prompt_template_name vicuna or chatml"
                )
        segments = [(self.template.get("chat_system", ""), False)]
        for turn in turns:
            role, text = turn_role_and_text(turn)
            if role in ("system",):  # the conversation's own system message, in place of the template's
                segments[0] = (self.template.get("chat_system_message", "{message}\n\n").format(message=text), False)
            elif role in ("human", "user"):
                segments.append((self.template["chat_user"].format(message=text), False))
            elif role in ("gpt", "assistant", "bot", "model"):
                segments.append((self.template["chat_assistant"].format(message=text), True))
            else:
                raise UsageError(f"conversation turn with unknown role {role!r}; use human/gpt or user/assistant")
        return [s for s in segments if s[0]]

    def response(self, generated: str) -> str:
        """The answer part of a decoded generation: after the response marker, before any stop string."""
        marker = self.template["response_split"]
        text = generated.split(marker, 1)[1] if marker in generated else generated
        for stop in self.template.get("stop", []):
            text = text.split(stop, 1)[0]
        return text.strip()
