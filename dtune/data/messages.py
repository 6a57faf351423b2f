"""Chat messages, field by field: what one message, a list of turns, a reply or a tools list of a record must be,
and the form the chat template receives it in. Every problem raises :class:`~dtune.errors.DataError` naming the
record (``where``: file and line) and the field.

Tool calls come in OpenAI's form, ``{"type": "function", "function": {"name": str, "arguments": ...}}`` (or the bare
``{"name", "arguments"}``). OpenAI's API gives ``arguments`` as a JSON string; transformers' chat templates take an
object (most write it with ``tojson``: a string would be written as an escaped JSON string, which the model would
learn to emit). A string is parsed here; a template that wants the text back gets it from the renderer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from dtune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "train", "weight"}
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
"""A turn's start in Anthropic HH-RLHF's transcripts: ``"\n\nHuman: ...\n\nAssistant: ..."``."""


class UnknownKeys:
    """Counts record keys (and message keys, as ``messages[].key``) that the format does not read; :meth:`summary`
    says which, how often and where first."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def note(self, keys: set[str], where: str, prefix: str = "") -> None:
        for key in sorted(keys):
            self.add(prefix + key, 1, where)

    def add(self, name: str, count: int, where: str) -> None:
        """``count`` more of key ``name``, first seen at ``where`` unless seen before."""
        self.counts[name] += count
        self.first.setdefault(name, where)

    def merge(self, other: UnknownKeys) -> None:
        """Add ``other``'s counts (another rank's, a later batch's): where first stays this one's where it has one."""
        for name, count in other.counts.items():
            self.add(name, count, other.first[name])

    def summary(self) -> str:
        return ", ".join(f"'{k}' {n} times (first at {self.first[k]})" for k, n in self.counts.most_common())


def string(obj: dict, key: str, where: str, required: bool = True) -> str:
    """Field ``key`` of ``obj``, a string ("" when absent or null and not ``required``)."""
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def nonempty(value: str, key: str, where: str) -> str:
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def content(value: Any, at: str) -> str:
    """A message's content: a string, null, or a list of text parts (joined). Other parts (images) are refused."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{at}: content[{j}] is a {kind!r} part; only text parts are supported")
        return "".join(texts)
    raise DataError(f"{at}: field 'content' must be a string or a list of text parts, got {type(value).__name__}")


def tool_call(call: Any, at: str) -> dict[str, Any]:
    """One tool call with its ``arguments`` an object: a JSON string (OpenAI's form) is parsed, "" is no arguments.
    Raises DataError for a call without a function name, or arguments that are not a JSON object."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise DataError(f"{at}: a tool call must be an object with a function 'name' (and 'arguments')")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise DataError(f"{at}: tool call '{fn['name']}': 'arguments' is a string but not JSON ({err.msg})") from None
    if args is not None and not isinstance(args, dict):
        raise DataError(f"{at}: tool call '{fn['name']}': 'arguments' must be a JSON object, got {type(args).__name__}")
    if args is fn.get("arguments"):
        return call
    fn = {**fn, "arguments": args}
    return {**call, "function": fn} if "function" in call else fn


def message(m: Any, at: str, role: str, text: Any) -> tuple[dict[str, Any], bool]:
    """One message as the template gets it (content ``text``), and whether it is trained (assistant turns unless
    opted out with ``"train": false`` or ``"weight": 0``)."""
    out: dict[str, Any] = {"role": role, "content": content(text, at)}
    trained = True
    if isinstance(m, dict):
        for key in ("tool_calls", "tool_call_id", "name", "reasoning_content"):
            if m.get(key) is not None:
                out[key] = m[key]
        if "tool_calls" in out:
            if role != "assistant" or not isinstance(out["tool_calls"], list):
                raise DataError(f"{at}: 'tool_calls' must be a list, on an assistant message")
            out["tool_calls"] = [tool_call(c, f"{at}: tool_calls[{j}]") for j, c in enumerate(out["tool_calls"])]
        if m.get("train") is not None and not isinstance(m["train"], bool):
            raise DataError(f"{at}: field 'train' must be true or false, got {m['train']!r}")
        if m.get("weight") is not None and m["weight"] not in (0, 1):
            raise DataError(f"{at}: field 'weight' must be 0 or 1, got {m['weight']!r}")
        trained = m.get("train") is not False and m.get("weight") != 0
    if role == "assistant" and not out["content"].strip() and not out.get("tool_calls"):
        raise DataError(f"{at}: the assistant turn is empty")
    return out, trained


def tools(obj: dict, where: str) -> list[Any] | None:
    """A record's tool definitions (OpenAI ``tools``), None when it has none; a JSON string (LLaMA-Factory's ShareGPT
    keeps them so) is parsed."""
    value = obj.get("tools")
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: field 'tools' is a string but not JSON ({err.msg})") from None
    if value in (None, "", []):
        return None
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'tools' must be a list of tool definitions")
    return value


def function_call(value: str, at: str) -> dict[str, Any]:
    """A ShareGPT ``function_call`` turn's value, JSON ``{name, arguments}``, as an OpenAI tool call."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{at}: a function_call value must be JSON {{name, arguments}} ({err.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError(f"{at}: a function_call value must be a JSON object with a 'name'")
    return tool_call({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}, at)


def turns(value: Any, key: str, where: str, role: str, unknown: UnknownKeys | None) -> list[dict[str, Any]]:
    """A prompt or reply field: a string (one ``role`` message), a message, or a non-empty list of messages. Only a
    ``prompt`` may hold turns opted out of training."""
    if isinstance(value, str):  # an empty reply is refused as an empty assistant turn is (nothing to learn from)
        return [message(None, f"{where}: {key}", role, value)[0]]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field '{key}' must be a string, a message or a non-empty list of messages")
    out = []
    for i, m in enumerate(items):
        at = f"{where}: {key}" + (f"[{i}]" if isinstance(value, list) else "")
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with role and content")
        r = string(m, "role", at)
        if r not in ROLES:
            raise DataError(f"{at}: role {r!r} is not one of {', '.join(ROLES)}")
        if "content" not in m and not m.get("tool_calls"):
            raise DataError(f"{at}: missing field 'content'")
        if unknown is not None and (extra := set(m) - MESSAGE_KEYS):
            unknown.note(extra, at, prefix=f"{key}[].")
        msg, trained = message(m, at, r, m.get("content"))
        if not trained and key != "prompt":
            raise DataError(f"{at}: a reply is trained as a whole; 'train': false (or 'weight': 0) has no place in it")
        out.append(msg)
    return out


def reply(messages: list[dict[str, Any]], key: str, where: str) -> list[dict[str, Any]]:
    """``messages`` checked as a reply: assistant (and tool) messages, the first an assistant's."""
    if not messages:
        raise DataError(f"{where}: field '{key}' holds nothing after the prompt")
    if messages[0]["role"] != "assistant" or any(m["role"] not in ("assistant", "tool") for m in messages):
        roles = [m["role"] for m in messages]
        raise DataError(f"{where}: field '{key}': a reply is assistant (and tool) messages after the prompt; got {roles}")
    return messages


def transcript(text: str) -> list[dict[str, Any]] | None:
    """Anthropic HH-RLHF's transcript (``"\\n\\nHuman: Q\\n\\nAssistant: A..."``, the whole conversation in one string)
    as messages, each content stripped; None for text that does not start with a turn marker. An empty last turn
    stays empty (an empty reply is refused where replies are checked). A transcript stripped of its leading blank
    line (``"Human: Q\\n\\nAssistant: A"``, as many copies of the set are) is one too."""
    if not text.startswith("\n\n") and text.lstrip().startswith("Human:") and "\n\nAssistant:" in text:
        text = "\n\n" + text.lstrip()
    parts = TRANSCRIPT_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [
        {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
        for who, said in zip(parts[1::2], parts[2::2], strict=True)
    ]
