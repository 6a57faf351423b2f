"""Data formats: one JSON object -> one :class:`Row` of chat messages (or raw text), checked field by field.

``data.format`` (one example row each in the README):

* ``prompt_completion`` -- ``{"prompt": str, "completion": str}``
* ``alpaca`` -- ``{"instruction": str, "input": str?, "output": str, "system": str?, "history": [[str, str], ...]?}``
  (``history``: earlier (instruction, answer) turns, trained like the last one)
* ``chat`` -- OpenAI messages: ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...},
  ...], "tools": [...]?}``. ``content`` is a string or a list of ``{"type": "text", "text": str}`` parts; an assistant
  message may carry ``tool_calls`` (its content may then be empty) and ``"train": false`` (or ``"weight": 0``) to keep
  it out of the loss. Tool calls and tool results are rendered by the chat template's own tool support.
* ``sharegpt`` -- ``{"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}, ...],
  "system": str?, "tools": ...?}`` with the usual role names (see :data:`SHAREGPT_ROLES`).
* ``text`` -- ``{"text": str}``: continued pre-training, every token is trained on.
* ``preference`` -- ``{"prompt": str | [messages], "chosen": reply, "rejected": reply, "system": str?, "tools": ...?}`` for the
  preference objectives (DPO, ORPO, SimPO, KTO). A reply is a string, an assistant message, or a list of messages.
  Conversations that repeat the prompt in both replies (``chosen: [user, assistant]``, as UltraFeedback ships them),
  or carry it only there (no ``prompt``), are split where chosen and rejected first differ.
* ``kto`` -- ``{"prompt": ..., "completion": reply, "label": true | false, "system": str?}``: one completion marked
  desirable or not (KTO's unpaired data).

Keys a format does not know are not an error -- datasets carry ids and metadata -- but they are counted and warned
about once per run (:class:`UnknownKeys`), never dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dtune.errors import DataError

FORMATS = ("prompt_completion", "alpaca", "chat", "sharegpt", "text", "preference", "kto")
PREFERENCE_FORMATS = ("preference", "kto")
"""Formats of the preference objectives: their rows are pairs, or completions labelled desirable or not."""
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    **dict.fromkeys(("human", "user"), "user"),
    **dict.fromkeys(("gpt", "assistant", "model", "chatgpt", "bing", "bard", "bot"), "assistant"),
    "system": "system",
    **dict.fromkeys(("tool", "function_response", "observation", "ipython"), "tool"),
    "function_call": "assistant",  # its value is a JSON tool call
}
# Keys each format reads; anything else is counted by UnknownKeys.
KNOWN_KEYS = {
    "prompt_completion": {"prompt", "completion"},
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "chat": {"messages", "tools"},
    "sharegpt": {"conversations", "system", "tools"},
    "text": {"text"},
    "preference": {"prompt", "chosen", "rejected", "system", "tools"},
    "kto": {"prompt", "completion", "label", "system", "tools"},
}
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "train", "weight"}

# ChatML, for tokenizers that ship no chat template.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Row:
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Chat messages as the template receives them: role, content (str) and, where given, tool_calls etc."""
    where: str = ""
    """File and line (or package and record) the row came from, for error messages."""
    text: str | None = None
    """Raw text (format ``text``) instead of messages."""
    tools: list[Any] | None = None
    """Tool (function) definitions passed to the chat template (OpenAI ``tools``)."""
    untrained: frozenset[int] = frozenset()
    """Indices of assistant messages kept out of the loss (``"train": false``; a preference row's prompt turns)."""
    rejected: list[dict[str, Any]] | None = None
    """A preference pair's rejected reply (``messages`` holds the prompt and the chosen reply)."""
    prompt_turns: int = 0
    """A preference or KTO row: how many of ``messages`` are the prompt (the rest is the reply)."""
    desirable: bool | None = None
    """A KTO row: whether its completion is desirable."""

    @classmethod
    def single(cls, prompt: str, completion: str, where: str, system: str = "") -> Row:
        head = [{"role": "system", "content": system}] if system else []
        return cls([*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], where)

    @property
    def completion(self) -> str:
        """The last assistant message (the answer that accuracy is scored on)."""
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""


class UnknownKeys:
    """Counts record keys (and message keys, as ``messages[].key``) that the format does not read; :meth:`summary`
    says which, how often and where first."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def note(self, keys: set[str], where: str, prefix: str = "") -> None:
        for key in sorted(keys):
            name = prefix + key
            self.counts[name] += 1
            self.first.setdefault(name, where)

    def summary(self) -> str:
        return ", ".join(f"'{k}' {n} times (first at {self.first[k]})" for k, n in self.counts.most_common())


def _string(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj or (obj[key] is None and not required):
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


def _content(value: Any, at: str) -> str:
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


def _message(m: Any, at: str, role: str, content: Any) -> tuple[dict[str, Any], bool]:
    """One message as the template gets it, and whether it is trained (assistant turns unless opted out)."""
    out: dict[str, Any] = {"role": role, "content": _content(content, at)}
    trained = True
    if isinstance(m, dict):
        for key in ("tool_calls", "tool_call_id", "name", "reasoning_content"):
            if m.get(key) is not None:
                out[key] = m[key]
        if "tool_calls" in out and (role != "assistant" or not isinstance(out["tool_calls"], list)):
            raise DataError(f"{at}: 'tool_calls' must be a list, on an assistant message")
        if m.get("train") is not None and not isinstance(m["train"], bool):
            raise DataError(f"{at}: field 'train' must be true or false, got {m['train']!r}")
        if m.get("weight") is not None and m["weight"] not in (0, 1):
            raise DataError(f"{at}: field 'weight' must be 0 or 1, got {m['weight']!r}")
        trained = m.get("train") is not False and m.get("weight") != 0
    if role == "assistant" and not out["content"].strip() and not out.get("tool_calls"):
        raise DataError(f"{at}: the assistant turn is empty")
    return out, trained


def _tools(obj: dict, where: str) -> list[Any] | None:
    tools = obj.get("tools")
    if isinstance(tools, str) and tools.strip():  # LLaMA-Factory's ShareGPT keeps them as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: field 'tools' is a string but not JSON ({err.msg})") from None
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools' must be a list of tool definitions")
    return tools


def _conversation(obj: dict, where: str, fmt: str, unknown: UnknownKeys | None) -> Row:
    key = "messages" if fmt == "chat" else "conversations"
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        hint = " (ShareGPT rows: set data.format=sharegpt)" if fmt == "chat" and "conversations" in obj else ""
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages{hint}")
    out: list[dict[str, Any]] = []
    untrained = set()
    if fmt == "sharegpt" and (system := _string(obj, "system", where, required=False)).strip():
        out.append({"role": "system", "content": system})
    for i, m in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with {'role and content' if fmt == 'chat' else 'from and value'}")
        if fmt == "chat":
            role, content = _string(m, "role", at), m.get("content")
            if role not in ROLES:
                raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
            if "content" not in m and not m.get("tool_calls"):
                raise DataError(f"{at}: missing field 'content'")
            extra = set(m) - MESSAGE_KEYS
        else:
            source = _string(m, "from", at)
            if source not in SHAREGPT_ROLES:
                raise DataError(f"{at}: 'from' {source!r} is not one of {', '.join(SHAREGPT_ROLES)}")
            role, content = SHAREGPT_ROLES[source], _string(m, "value", at)
            if source == "function_call":
                m = {**m, "tool_calls": [_function_call(content, at)]}
                content = ""
            extra = set(m) - {"from", "value", "tool_calls", "train", "weight", "name"}
        if extra and unknown is not None:
            unknown.note(extra, at, prefix=f"{key}[].")
        message, trained = _message(m, at, role, content)
        if not trained:
            untrained.add(len(out))
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message to train on")
    return Row(out, where, tools=_tools(obj, where), untrained=frozenset(untrained))


def _function_call(value: str, at: str) -> dict[str, Any]:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{at}: a function_call value must be JSON {{name, arguments}} ({err.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError(f"{at}: a function_call value must be a JSON object with a 'name'")
    return {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def _alpaca(obj: dict, where: str) -> Row:
    instruction = _nonempty(_string(obj, "instruction", where), "instruction", where)
    extra = _string(obj, "input", where, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = _string(obj, "system", where, required=False)
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [instruction, answer] pairs")
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{i}] must be an [instruction, answer] pair of strings")
        if not pair[1].strip():
            raise DataError(f"{where}: history[{i}]: the answer is empty")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    output = _nonempty(_string(obj, "output", where), "output", where)
    return Row([*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}], where)


def _turns(value: Any, key: str, where: str, role: str, unknown: UnknownKeys | None) -> list[dict[str, Any]]:
    """A prompt or reply field: a string (one ``role`` message), a message, or a non-empty list of messages."""
    if isinstance(value, str):  # an empty reply is refused as an empty assistant turn is (nothing to learn from)
        return [_message(None, f"{where}: {key}", role, value)[0]]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field '{key}' must be a string, a message or a non-empty list of messages")
    out = []
    for i, m in enumerate(items):
        at = f"{where}: {key}" + (f"[{i}]" if isinstance(value, list) else "")
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with role and content")
        r = _string(m, "role", at)
        if r not in ROLES:
            raise DataError(f"{at}: role {r!r} is not one of {', '.join(ROLES)}")
        if "content" not in m and not m.get("tool_calls"):
            raise DataError(f"{at}: missing field 'content'")
        if unknown is not None and (extra := set(m) - MESSAGE_KEYS):
            unknown.note(extra, at, prefix=f"{key}[].")
        message, trained = _message(m, at, r, m.get("content"))
        if not trained and key != "prompt":
            raise DataError(f"{at}: a reply is trained as a whole; 'train': false (or 'weight': 0) has no place in it")
        out.append(message)
    return out


def _reply(turns: list[dict[str, Any]], key: str, where: str) -> list[dict[str, Any]]:
    if not turns:
        raise DataError(f"{where}: field '{key}' holds nothing after the prompt")
    if turns[0]["role"] != "assistant" or any(m["role"] not in ("assistant", "tool") for m in turns):
        roles = [m["role"] for m in turns]
        raise DataError(f"{where}: field '{key}': a reply is assistant (and tool) messages after the prompt; got {roles}")
    return turns


def _preference(obj: dict, where: str, fmt: str, unknown: UnknownKeys | None) -> Row:
    """A preference pair (``fmt`` preference) or a labelled completion (kto): the prompt's messages, then the reply."""
    prompt = _turns(obj["prompt"], "prompt", where, "user", unknown) if obj.get("prompt") is not None else []
    keys = ("chosen", "rejected") if fmt == "preference" else ("completion",)
    if missing := next((key for key in keys if obj.get(key) is None), None):
        raise DataError(f"{where}: missing field '{missing}'")
    replies = [_turns(obj[key], key, where, "assistant", unknown) for key in keys]
    for repeated in (prompt, prompt[1:] if prompt and prompt[0]["role"] == "system" else []):
        if repeated and all(r[: len(repeated)] == repeated for r in replies):  # the prompt (or its turns after the system)
            replies = [r[len(repeated) :] for r in replies]  # repeated in the replies
            break
    if fmt == "preference":  # what both replies start with is context: the prompt's, or the prompt itself
        shared = 0
        while shared < min(map(len, replies)) - 1 and replies[0][shared] == replies[1][shared]:
            shared += 1
    else:  # a completion that holds its conversation: the reply starts after the last user message
        shared = 0 if prompt else max((i + 1 for i, m in enumerate(replies[0]) if m["role"] == "user"), default=0)
    head = replies[0][:shared]
    # What both replies share is the prompt's context; when it ends with the prompt (a system message before it), it
    # is the whole prompt.
    prompt = head if prompt and head[-len(prompt) :] == prompt else [*prompt, *head]
    if not prompt:
        raise DataError(f"{where}: missing field 'prompt' (and the replies hold no prompt of their own)")
    system = _string(obj, "system", where, required=False)
    if system.strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    elif system.strip() and prompt[0]["content"] != system:
        raise DataError(f"{where}: field 'system' and the prompt's own system message differ; keep one")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{where}: the prompt must end with a user (or tool) message; it ends with {prompt[-1]['role']!r}")
    chosen = _reply(replies[0][shared:], keys[0], where)
    untrained = frozenset(i for i, m in enumerate(prompt) if m["role"] == "assistant")
    row = Row([*prompt, *chosen], where, tools=_tools(obj, where), untrained=untrained, prompt_turns=len(prompt))
    if fmt == "preference":
        row.rejected = _reply(replies[1][shared:], "rejected", where)
        if row.rejected == chosen:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply")
    else:
        if not isinstance(obj.get("label"), bool):
            raise DataError(f"{where}: field 'label' must be true (desirable) or false; got {obj.get('label')!r}")
        row.desirable = obj["label"]
    return row


def row_from_obj(obj: Any, where: str, fmt: str, unknown: UnknownKeys | None = None) -> Row:
    """Parse one record of format ``fmt``; every problem raises DataError naming ``where`` and the field. Keys the
    format does not read are counted in ``unknown``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object ({fmt} format), got {type(obj).__name__}")
    if fmt not in FORMATS:
        raise DataError(f"data.format: must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if unknown is not None and (extra := set(obj) - KNOWN_KEYS[fmt]):
        unknown.note(extra, where)
    if fmt == "prompt_completion":
        prompt = _string(obj, "prompt", where)
        return Row.single(prompt, _nonempty(_string(obj, "completion", where), "completion", where), where)
    if fmt == "alpaca":
        return _alpaca(obj, where)
    if fmt == "text":
        return Row(where=where, text=_nonempty(_string(obj, "text", where), "text", where))
    if fmt in PREFERENCE_FORMATS:
        return _preference(obj, where, fmt, unknown)
    return _conversation(obj, where, fmt, unknown)
