"""Data formats: one JSON object -> one :class:`Row` of chat messages (or raw text), checked field by field.

``data.format``:
* ``prompt_completion`` -- ``{"prompt": str, "completion": str}``
* ``alpaca`` -- ``{"instruction": str, "input": str (optional), "output": str}``
* ``chat`` -- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
* ``text`` -- ``{"text": str}``: continued pre-training, every token is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtune.errors import DataError

FORMATS = ("prompt_completion", "alpaca", "chat", "text")
ROLES = ("system", "user", "assistant")

# ChatML, for tokenizers that ship no chat template.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Row:
    messages: list[dict[str, str]] = field(default_factory=list)
    where: str = ""
    """File and line (or package and record) the row came from, for error messages."""
    text: str | None = None
    """Raw text (format ``text``) instead of messages."""

    @classmethod
    def single(cls, prompt: str, completion: str, where: str) -> Row:
        return cls([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], where)

    @property
    def completion(self) -> str:
        """The last assistant message (the answer that accuracy is scored on)."""
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""


def _string(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def _nonempty(value: str, key: str, where: str) -> str:
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def row_from_obj(obj: Any, where: str, fmt: str) -> Row:
    """Parse one record of format ``fmt``; every problem names ``where`` and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object ({fmt} format), got {type(obj).__name__}")
    if fmt == "prompt_completion":
        prompt = _string(obj, "prompt", where)
        return Row.single(prompt, _nonempty(_string(obj, "completion", where), "completion", where), where)
    if fmt == "alpaca":
        instruction = _nonempty(_string(obj, "instruction", where), "instruction", where)
        extra = _string(obj, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Row.single(prompt, _nonempty(_string(obj, "output", where), "output", where), where)
    if fmt == "text":
        return Row(where=where, text=_nonempty(_string(obj, "text", where), "text", where))
    if fmt == "chat":
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(messages):
            at = f"{where}: messages[{i}]"
            if not isinstance(m, dict):
                raise DataError(f"{at}: expected an object with 'role' and 'content'")
            role = _string(m, "role", at)
            if role not in ROLES:
                raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
            out.append({"role": role, "content": _string(m, "content", at)})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message to train on")
        return Row(out, where)
    raise DataError(f"data.format: must be one of {', '.join(FORMATS)}; got {fmt!r}")
