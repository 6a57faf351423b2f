"""Rendering: a Row becomes an Example -- chat template, tokenization, loss mask from character spans, truncation.

Each row is rendered to text once, and the loss mask comes from character spans of *that* rendering, mapped to
tokens through the tokenizer's offsets -- never from renders of the conversation's prefixes (templates rewrite
earlier turns: Qwen3 drops their reasoning and writes an empty think block on the last turn only) and never by
searching the token stream for a response template. Every error names the file and line at fault.

Which characters of an assistant turn are trained (the rule, for every template):

* the turn's content as the template wrote it (trimmed, reasoning dropped, ...), found by rendering the same
  conversation with that content replaced by a marker: what precedes and follows the marker is what precedes and
  follows the content;
* before it, whatever the template writes between the turn's header and the content (scaffolding such as the empty
  ``<think>\n\n</think>\n\n``): the turn starts where the generation prompt ends, because ``dtune generate``
  feeds the generation prompt and the model must write the rest itself;
* after it, the template's end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``): the
  model learns to stop. Not the newline the template writes after it.

An assistant turn with no user turn before it (a greeting that opens the conversation) is context, not trained;
nor is a turn marked ``"train": false``. Tool calls are trained as the template renders them; tool results are not.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from jinja2 import TemplateError

from dtune.data.encode import TextEncoder
from dtune.data.examples import IGNORE, DataStats, Example
from dtune.data.formats import CHATML, Row
from dtune.data.sources import BadRows
from dtune.data.template import MARKER, content_span, direct_renderer, marker, plain, put_back, tool_name
from dtune.errors import ConfigError, DataError
from dtune.schema import DataConfig, DtuneConfig


class Renderer:
    """Turns a Row into an Example: template, tokenization, loss mask from character spans, truncation.

    Messages are rendered with the tokenizer's chat template (ChatML when it has none), tools passed to it; the
    trained spans follow the rule in the module docstring. With ``data.chat_template=false`` a single-turn row is
    plain ``prompt + completion + eos``. The tokens of trained spans are labelled (see :meth:`_encode`);
    ``data.train_on=all`` trains on every token.

    Raises ConfigError at construction for a setting no row can satisfy (``data.system_prompt`` on a template that
    refuses or drops a system message), DataError naming the row for a row the template refuses.
    """

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("model.name_or_path: dtune needs a fast tokenizer (tokenizer.json) for offset mapping")
        self.tok = tokenizer
        self.cfg = cfg
        self.template = getattr(tokenizer, "chat_template", None) or CHATML
        self.stats = DataStats()
        self.encoder = TextEncoder(tokenizer)
        self._direct = direct_renderer(tokenizer, self.template, self.chat)  # plain messages: straight through
        self.end_of_turn = self._end_of_turn() if cfg.chat_template else None
        if cfg.system_prompt and cfg.chat_template:
            self._check_system_prompt(cfg.system_prompt)

    @property
    def templated(self) -> bool:
        """Whether prompts are rendered with the chat template (not for ``data.chat_template=false`` or text runs)."""
        return bool(self.cfg.chat_template) and self.cfg.format != "text"

    def chat(
        self, messages: list[dict[str, Any]], generation_prompt: bool = False, where: str = "", tools: list | None = None
    ) -> str:
        """``messages`` rendered with the chat template as training renders them (``generation_prompt``: ending with
        the assistant's turn opened). Raises DataError naming ``where`` when the template refuses them."""
        try:
            return self.tok.apply_chat_template(
                self._for_template(messages),
                chat_template=self.template,
                add_generation_prompt=generation_prompt,
                tokenize=False,
                tools=tools,
            )
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:  # e.g. roles that do not alternate
            raise DataError(f"{where}: the chat template refuses this conversation: {err}") from None

    @cached_property
    def _arguments_as_text(self) -> bool:
        """Whether the chat template wants tool-call arguments as JSON text rather than the object transformers
        documents (and rows hold, see :mod:`dtune.data.messages`): it fails on an object (DeepSeek-V3's concatenates
        them) or writes its Python form, and writes the text."""

        def rendered(arguments: Any) -> str:
            call = {"type": "function", "function": {"name": "probe", "arguments": arguments}}
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
            try:
                return self.tok.apply_chat_template(probe, chat_template=self.template, tokenize=False)
            except Exception:  # the template's own failure is the answer
                return ""

        json_key = '"dtune_probe"'
        return json_key not in rendered({"dtune_probe": 1}) and json_key in rendered('{"dtune_probe": 1}')

    def _for_template(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with their tool calls' arguments in the form the template takes (see :attr:`_arguments_as_text`)."""
        if not any(m.get("tool_calls") for m in messages) or not self._arguments_as_text:
            return messages
        return [
            {**m, "tool_calls": [_arguments_text(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages
        ]

    def _end_of_turn(self) -> str | None:
        """What the template writes right after an answer (``<|im_end|>``), up to the first whitespace; None if
        nothing."""
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": MARKER}]
        full = self.chat(probe, where="data.chat_template (probe conversation)")
        tail = full[full.index(MARKER) + len(MARKER) :].strip()
        return tail.split()[0] if tail else None

    def _check_system_prompt(self, system: str) -> None:
        probe = [{"role": "system", "content": system}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        try:
            text = self.chat(probe)
        except DataError as err:
            raise ConfigError(f"data.system_prompt: the chat template takes no system message ({err})") from None
        if system.strip() not in text:
            raise ConfigError("data.system_prompt: the chat template drops the system message; no row would see it")

    def _texts(self, row: Row) -> tuple[str, list[tuple[int, int]], int, bool]:
        """(full text, trained character spans, end of the last prompt, whether the text is templated)."""
        if row.text is not None:
            full = self._with_eos(row.text)
            return full, [(0, len(full))], 0, False
        messages = list(row.messages)
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        shift = len(messages) - len(row.messages)
        if not self.cfg.chat_template:
            if [m["role"] for m in messages] != ["user", "assistant"]:
                raise DataError(f"{row.where}: data.chat_template=false takes single-turn rows (one user, one assistant)")
            prompt, full = messages[0]["content"], self._with_eos(messages[0]["content"] + messages[1]["content"])
            return full, [(len(prompt), len(full))], len(prompt), False
        turns, seen_user = [], False
        for i, m in enumerate(messages):
            seen_user = seen_user or m["role"] == "user"
            if m["role"] == "assistant" and seen_user and (i - shift) not in row.untrained:
                turns.append(i)
        # The renderings the row needs: the conversation and the conversation with every trained turn's content marked
        # (one call to the template); when putting the contents back into the marked rendering does not give the
        # conversation's (the template rewrote a content, or renders a turn by what another holds), the conversation
        # with each turn marked alone; then each turn's generation prompt.
        contents = [messages[i]["content"] for i in turns]
        together = [{**m, "content": marker(turns.index(i))} if i in turns else m for i, m in enumerate(messages)]
        full, marked = self._chat_many([messages, together], False, row.tools)
        if full is None:
            full = self.chat(messages, where=row.where, tools=row.tools)  # raises, naming the row and the reason
        if row.tools and not all(tool_name(t) in full for t in row.tools):
            raise DataError(f"{row.where}: the chat template does not render the row's tools (no tool support)")
        if not turns:
            raise DataError(f"{row.where}: no assistant turn to train on (each follows no user turn, or is opted out)")
        contents_at = put_back(full, marked, contents) if marked is not None else None
        if contents_at is None:
            if len(turns) == 1:
                variants = [marked]
            else:
                alone = [[*messages[:i], {**messages[i], "content": marker(0)}, *messages[i + 1 :]] for i in turns]
                variants = self._chat_many(alone, False, row.tools)
            contents_at = [content_span(full, v or "", marker(0)) for v in variants]
        headers = self._chat_many([messages[:i] for i in turns], True, row.tools)
        spans = [
            self._turn(full, content, header, f"{row.where}: messages[{i}]")
            for i, content, header in zip(turns, contents_at, headers, strict=True)
        ]
        _check_tool_calls(messages, dict(zip(turns, spans, strict=True)), full, row.where)
        # The prompt ends where the last trained turn starts -- where the reply starts, for a preference or KTO row.
        return full, spans, spans[0 if row.prompt_turns else -1][0], True

    def _with_eos(self, text: str) -> str:
        """An untemplated text and the eos it is trained to write: appended unless the text already ends with it (as
        TRL's trainers add it: data prepared for them often carries it), so it is not trained twice."""
        eos = self.tok.eos_token or ""
        return text if eos and text.endswith(eos) else text + eos

    def _chat_many(
        self, conversations: list[list[dict[str, Any]]], generation_prompt: bool, tools: list | None
    ) -> list[str | None]:
        """Each conversation rendered as :meth:`chat` renders it, None where the template refuses it: straight through
        the compiled template when every message is plain (:func:`~dtune.data.template.direct_renderer`), else in one call to
        ``apply_chat_template`` when the template refuses none (a third less time than one call each)."""
        if self._direct is not None and tools is None and all(plain(c) for c in conversations):
            try:
                return [self._direct(c, generation_prompt) for c in conversations]
            except Exception:  # the template's own errors: apply_chat_template below says them
                pass
        try:
            return list(
                self.tok.apply_chat_template(
                    [self._for_template(c) for c in conversations],
                    chat_template=self.template,
                    add_generation_prompt=generation_prompt,
                    tokenize=False,
                    tools=tools,
                )
            )
        except (TemplateError, ValueError, TypeError, KeyError, IndexError):
            pass
        rendered: list[str | None] = []
        for conversation in conversations:
            try:
                rendered.append(self.chat(conversation, generation_prompt, tools=tools))
            except DataError:
                rendered.append(None)
        return rendered

    def _turn(self, full: str, content: tuple[int, int] | None, header: str | None, at: str) -> tuple[int, int]:
        """Character span in ``full`` of the assistant turn whose content is at ``content`` in it (None: not found),
        and whose generation prompt ends ``header`` (see the module docstring)."""
        start = content[0] if content else None
        if header is not None and full.startswith(header) and (content is None or len(header) <= content[0]):
            start = len(header)
        if start is None:
            raise DataError(f"{at}: cannot find this assistant turn in the chat template's rendering of the conversation")
        after_content = content[1] if content else start
        if self.end_of_turn:
            j = full.find(self.end_of_turn, after_content)
            if j >= 0:
                return start, j + len(self.end_of_turn)
        if content is None:
            raise DataError(f"{at}: cannot find where this assistant turn ends in the chat template's rendering")
        return start, content[1]

    def _encode(self, row: Row) -> tuple[list[int], list[int], int]:
        """Token ids, labels and prompt length of the row's text (:meth:`TextEncoder.encode`)."""
        full, spans, prompt_end, templated = self._texts(row)
        if self.cfg.train_on == "all":
            spans = [(0, len(full))]
        return self.encoder.encode(full, spans, prompt_end, templated)

    def _pair(self, row: Row) -> Example | None:
        """A preference pair: the chosen reply's Example holding the rejected one's (``rejected``), both with the
        prompt's tokens whole; replies longer than data.max_seq_len allows are cut alike (the pair counted once as
        truncated), and a pair whose prompt leaves no room for a reply token is dropped."""
        assert row.rejected is not None
        prompt = row.messages[: row.prompt_turns]
        rejected = Row([*prompt, *row.rejected], row.where, tools=row.tools, untrained=row.untrained, prompt_turns=len(prompt))
        pair = [self._encode(row), self._encode(rejected)]
        (ids, _, prompt_len), (other, _, other_len) = pair
        if prompt_len != other_len or ids[:prompt_len] != other[:prompt_len]:
            raise DataError(f"{row.where}: the chat template renders the prompt differently before the two replies")
        max_len = self.cfg.max_seq_len
        longest = max(len(ids), len(other))
        if longest > max_len:
            if self.cfg.overlong == "error":
                raise DataError(
                    f"{row.where}: {longest} tokens (prompt {prompt_len}) exceeds data.max_seq_len={max_len} "
                    "(data.overlong=error)"
                )
            if self.cfg.overlong == "drop" or prompt_len >= max_len:
                self.stats.dropped += 1  # dropped by config, or the prompt alone fills the row
                return None
            pair = [(i[:max_len], lab[:max_len], n) for i, lab, n in pair]
            self.stats.truncated += 1
        for (_, labels, _), name in zip(pair, ("chosen", "rejected"), strict=True):
            if labels[1:].count(IGNORE) == len(labels) - 1:
                raise DataError(f"{row.where}: nothing to train on (the {name} reply renders to no tokens)")
        example = Example(*pair[0])
        example.rejected = Example(*pair[1])
        return example

    def __call__(self, row: Row) -> Example | None:
        if row.rejected is not None:
            return self._pair(row)
        ids, labels, prompt_len = self._encode(row)
        max_len = self.cfg.max_seq_len
        if len(ids) > max_len:
            if self.cfg.overlong == "error":
                raise DataError(f"{row.where}: {len(ids)} tokens exceeds data.max_seq_len={max_len} (data.overlong=error)")
            if self.cfg.overlong == "drop" or labels[:max_len].count(IGNORE) == max_len:
                self.stats.dropped += 1  # dropped by config, or truncation would leave no trained token
                return None
            ids, labels, prompt_len = ids[:max_len], labels[:max_len], min(prompt_len, max_len)
            self.stats.truncated += 1
        if labels[1:].count(IGNORE) == len(labels) - 1:  # (list.count runs in C: this is per row)
            raise DataError(f"{row.where}: nothing to train on (the answer renders to no tokens)")
        example = Example(ids, labels, prompt_len, desirable=row.desirable)
        if self.cfg.choices:
            gold = row.completion.strip()
            if gold not in self.cfg.choices:
                raise DataError(f"{row.where}: completion {gold!r} is not one of data.choices {list(self.cfg.choices)}")
            example.choice_ids = [self._choice_tokens(row, c) for c in self.cfg.choices]
            example.gold = list(self.cfg.choices).index(gold)
        return example

    def _choice_tokens(self, row: Row, choice: str) -> list[int]:
        """Tokens of ``choice`` as the answer to ``row``'s last prompt."""
        alt = Row([*row.messages[:-1], {"role": "assistant", "content": choice}], row.where)
        ids, labels, prompt_len = self._encode(alt)
        return [t for t, lab in zip(ids[prompt_len:], labels[prompt_len:], strict=True) if lab != IGNORE]


def _arguments_text(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call with its arguments object written as JSON text."""
    fn = call.get("function", call)
    if not isinstance(fn.get("arguments"), dict):
        return call
    fn = {**fn, "arguments": json.dumps(fn["arguments"], ensure_ascii=False)}
    return {**call, "function": fn} if "function" in call else fn


def _check_tool_calls(messages: list[dict[str, Any]], spans: dict[int, tuple[int, int]], full: str, where: str) -> None:
    """Refuses a row whose tool calls the template does not write (no tool-call support, and no ``tools`` list that
    would have said so): each call's name must be in its turn's trained span (in the text, for a context turn). Else
    a call-only turn would be trained as an immediate end of turn."""
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or ():
            name = tool_name(call)
            if name and name not in (full[slice(*spans[i])] if i in spans else full):
                raise DataError(
                    f"{where}: messages[{i}]: the chat template does not render this turn's tool calls (no tool support)"
                )


def prompt_format(cfg: DtuneConfig, tokenizer: Any) -> dict[str, Any]:
    """How a run's prompts were rendered, for what it exports (merged model, adapter): whether the chat template
    (the tokenizer's, saved beside) was used, its end-of-turn marker, the system prompt."""
    renderer = Renderer(tokenizer, cfg.data)
    if not renderer.templated:
        note = "trained on plain text without a chat template: prompt it with plain text, it ends answers with eos"
        return {"chat_template": False, "end_of_turn": None, "system_prompt": None, "note": note}
    return {"chat_template": True, "end_of_turn": renderer.end_of_turn, "system_prompt": cfg.data.system_prompt}


def build_examples(rows: list[Row], renderer: Renderer, what: str, bad: BadRows | None = None) -> list[Example]:
    """Examples of ``rows``; a row the template or tokenizer cannot make into one raises DataError naming it, or is
    counted and skipped (``bad``, data.bad_rows=skip)."""
    bad = bad or BadRows()
    examples = []
    for row in rows:
        try:
            example = renderer(row)
        except DataError as err:
            bad(err)
            continue
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"data: no {what} sample is left after tokenization (all bad, or longer than data.max_seq_len?)")
    return examples
