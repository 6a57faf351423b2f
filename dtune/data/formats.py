"""Data formats: one JSON object -> one :class:`Row` of chat messages (or raw text), checked field by field.

``data.format`` (one example row each in the README):

* ``prompt_completion`` -- ``{"prompt": str, "completion": str}``, or TRL's conversational form: ``prompt`` messages
  (system, earlier turns), ``completion`` the assistant's (and tool) messages that follow, ``tools`` optional; only
  the completion is trained
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
  or carry it only there (no ``prompt``), are split where chosen and rejected first differ; so are Anthropic HH-RLHF's
  transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings, no ``prompt``), read as conversations.
* ``kto`` -- ``{"prompt": ..., "completion": reply, "label": true | false, "system": str?}``: one completion marked
  desirable or not (KTO's unpaired data).

Keys a format does not know are not an error -- datasets carry ids and metadata -- but they are counted and warned
about once per run (:class:`UnknownKeys`), never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtune.data import messages as msgs
from dtune.data.messages import UnknownKeys
from dtune.errors import DataError

FORMATS = ("prompt_completion", "alpaca", "chat", "sharegpt", "text", "preference", "kto")
PREFERENCE_FORMATS = ("preference", "kto")
"""Formats of the preference objectives: their rows are pairs, or completions labelled desirable or not."""
SHAREGPT_ROLES = {
    **dict.fromkeys(("human", "user"), "user"),
    **dict.fromkeys(("gpt", "assistant", "model", "chatgpt", "bing", "bard", "bot"), "assistant"),
    "system": "system",
    **dict.fromkeys(("tool", "function_response", "observation", "ipython"), "tool"),
    "function_call": "assistant",  # its value is a JSON tool call
}
# Keys each format reads; anything else is counted by UnknownKeys.
KNOWN_KEYS = {
    "prompt_completion": {"prompt", "completion", "tools"},
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "chat": {"messages", "tools"},
    "sharegpt": {"conversations", "system", "tools"},
    "text": {"text"},
    "preference": {"prompt", "chosen", "rejected", "system", "tools"},
    "kto": {"prompt", "completion", "label", "system", "tools"},
}

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


def _conversation(obj: dict, where: str, fmt: str, unknown: UnknownKeys | None) -> Row:
    key = "messages" if fmt == "chat" else "conversations"
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        hint = " (ShareGPT rows: set data.format=sharegpt)" if fmt == "chat" and "conversations" in obj else ""
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages{hint}")
    out: list[dict[str, Any]] = []
    untrained = set()
    if fmt == "sharegpt" and (system := msgs.string(obj, "system", where, required=False)).strip():
        out.append({"role": "system", "content": system})
    for i, m in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with {'role and content' if fmt == 'chat' else 'from and value'}")
        if fmt == "chat":
            role, content = msgs.string(m, "role", at), m.get("content")
            if role not in msgs.ROLES:
                raise DataError(f"{at}: role {role!r} is not one of {', '.join(msgs.ROLES)}")
            if "content" not in m and not m.get("tool_calls"):
                raise DataError(f"{at}: missing field 'content'")
            extra = set(m) - msgs.MESSAGE_KEYS
        else:
            source = msgs.string(m, "from", at)
            if source not in SHAREGPT_ROLES:
                raise DataError(f"{at}: 'from' {source!r} is not one of {', '.join(SHAREGPT_ROLES)}")
            role, content = SHAREGPT_ROLES[source], msgs.string(m, "value", at)
            if source == "function_call":
                m = {**m, "tool_calls": [msgs.function_call(content, at)]}
                content = ""
            extra = set(m) - {"from", "value", "tool_calls", "train", "weight", "name"}
        if extra and unknown is not None:
            unknown.note(extra, at, prefix=f"{key}[].")
        message, trained = msgs.message(m, at, role, content)
        if not trained:
            untrained.add(len(out))
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message to train on")
    return Row(out, where, tools=msgs.tools(obj, where), untrained=frozenset(untrained))


def _alpaca(obj: dict, where: str) -> Row:
    instruction = msgs.nonempty(msgs.string(obj, "instruction", where), "instruction", where)
    extra = msgs.string(obj, "input", where, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = msgs.string(obj, "system", where, required=False)
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
    output = msgs.nonempty(msgs.string(obj, "output", where), "output", where)
    return Row([*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}], where)


def _preference(obj: dict, where: str, fmt: str, unknown: UnknownKeys | None) -> Row:
    """A preference pair (``fmt`` preference) or a labelled completion (kto): the prompt's messages, then the reply."""
    head = msgs.transcript(obj["prompt"]) if isinstance(obj.get("prompt"), str) else None
    if head:  # an HH transcript up to the reply (Dahoas' sets end it with the reply's empty "\n\nAssistant:")
        prompt = head[:-1] if head[-1] == {"role": "assistant", "content": ""} else head
    else:
        prompt = msgs.turns(obj["prompt"], "prompt", where, "user", unknown) if obj.get("prompt") is not None else []
    keys = ("chosen", "rejected") if fmt == "preference" else ("completion",)
    if missing := next((key for key in keys if obj.get(key) is None), None):
        raise DataError(f"{where}: missing field '{missing}'")
    values = [obj[key] for key in keys]
    if head:  # the transcript's replies: their raw text's leading space goes, as it does in a whole transcript
        values = [v.strip() if isinstance(v, str) else v for v in values]
    # Anthropic HH-RLHF: each reply the whole transcript, no prompt (or an empty one: a table's blank prompt column).
    unprompted = not prompt or (isinstance(obj["prompt"], str) and not obj["prompt"].strip())
    read = [msgs.transcript(v) or v for v in values] if unprompted and all(isinstance(v, str) for v in values) else values
    if read != values:
        prompt, values = [], read
    replies = [msgs.turns(value, key, where, "assistant", unknown) for key, value in zip(keys, values, strict=True)]
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
    system = msgs.string(obj, "system", where, required=False)
    if system.strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    elif system.strip() and prompt[0]["content"] != system:
        raise DataError(f"{where}: field 'system' and the prompt's own system message differ; keep one")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{where}: the prompt must end with a user (or tool) message; it ends with {prompt[-1]['role']!r}")
    chosen = msgs.reply(replies[0][shared:], keys[0], where)
    untrained = frozenset(i for i, m in enumerate(prompt) if m["role"] == "assistant")
    row = Row([*prompt, *chosen], where, tools=msgs.tools(obj, where), untrained=untrained, prompt_turns=len(prompt))
    if fmt == "preference":
        row.rejected = msgs.reply(replies[1][shared:], "rejected", where)
        if row.rejected == chosen:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply")
    else:
        if not isinstance(obj.get("label"), bool):
            raise DataError(f"{where}: field 'label' must be true (desirable) or false; got {obj.get('label')!r}")
        row.desirable = obj["label"]
    return row


def _prompt_completion(obj: dict, where: str, unknown: UnknownKeys | None) -> Row:
    """A prompt and its completion, each a string or messages (TRL's conversational prompt-completion): the prompt's
    own assistant turns are context, the completion's assistant turns are trained."""
    if not (isinstance(obj.get("prompt"), list | dict) or isinstance(obj.get("completion"), list | dict) or "tools" in obj):
        prompt = msgs.string(obj, "prompt", where)
        return Row.single(prompt, msgs.nonempty(msgs.string(obj, "completion", where), "completion", where), where)
    if missing := next((key for key in ("prompt", "completion") if obj.get(key) is None), None):
        raise DataError(f"{where}: missing field '{missing}'")
    prompt = msgs.turns(obj["prompt"], "prompt", where, "user", unknown)
    if prompt[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{where}: the prompt must end with a user (or tool) message; it ends with {prompt[-1]['role']!r}")
    completion = msgs.reply(msgs.turns(obj["completion"], "completion", where, "assistant", unknown), "completion", where)
    untrained = frozenset(i for i, m in enumerate(prompt) if m["role"] == "assistant")
    return Row([*prompt, *completion], where, tools=msgs.tools(obj, where), untrained=untrained)


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
        return _prompt_completion(obj, where, unknown)
    if fmt == "alpaca":
        return _alpaca(obj, where)
    if fmt == "text":
        return Row(where=where, text=msgs.nonempty(msgs.string(obj, "text", where), "text", where))
    if fmt in PREFERENCE_FORMATS:
        return _preference(obj, where, fmt, unknown)
    return _conversation(obj, where, fmt, unknown)
