"""Rendering: a Row becomes an Example -- chat template, tokenization, loss mask from character spans, truncation.

Each row is rendered to text once, and the loss mask comes from character spans of that rendering (the completion
starts where the rendered prompt ends), mapped to tokens through the tokenizer's offsets -- never by searching the
token stream for a response template. Every error names the file and line at fault.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from dtune.data.examples import IGNORE, DataStats, Example
from dtune.data.formats import CHATML, Row
from dtune.errors import DataError
from dtune.schema import DataConfig


class Renderer:
    """Turns a Row into an Example: template, tokenization, loss mask from character spans, truncation.

    Messages are rendered with the tokenizer's chat template (ChatML when it has none); each assistant turn's span
    is where the rendering of the conversation up to that turn extends the rendering up to its generation prompt.
    With ``data.chat_template=false`` a single-turn row is plain ``prompt + completion + eos``. Tokens overlapping a
    trained span are labelled; ``data.train_on=all`` trains on every token.
    """

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("model.name_or_path: dtune needs a fast tokenizer (tokenizer.json) for offset mapping")
        self.tok = tokenizer
        self.cfg = cfg
        self.template = getattr(tokenizer, "chat_template", None) or CHATML
        self.stats = DataStats()

    def chat(self, messages: list[dict[str, str]], generation_prompt: bool = False, where: str = "") -> str:
        """``messages`` rendered with the chat template as training renders them (``generation_prompt``: ending with
        the assistant's turn opened). Raises DataError naming ``where`` when the template refuses them."""
        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.template, add_generation_prompt=generation_prompt, tokenize=False
            )
        except TemplateError as err:  # templates refuse e.g. a system turn or non-alternating roles
            raise DataError(f"{where}: the chat template refuses this conversation: {err}") from None

    def _texts(self, row: Row) -> tuple[str, list[tuple[int, int]], int, bool]:
        """(full text, trained character spans, end of the last prompt, whether the text is templated)."""
        if row.text is not None:
            full = row.text + (self.tok.eos_token or "")
            return full, [(0, len(full))], 0, False
        messages = list(row.messages)
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        if not self.cfg.chat_template:
            if [m["role"] for m in messages] != ["user", "assistant"]:
                raise DataError(f"{row.where}: data.chat_template=false takes single-turn rows (one user, one assistant)")
            prompt, full = messages[0]["content"], messages[0]["content"] + messages[1]["content"] + (self.tok.eos_token or "")
            return full, [(len(prompt), len(full))], len(prompt), False
        full = self.chat(messages, where=row.where)
        spans, prompt_end = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.chat(messages[:i], generation_prompt=True, where=row.where)
            upto = self.chat(messages[: i + 1], where=row.where)
            if not (upto.startswith(head) and full.startswith(upto)):
                raise DataError("data.chat_template: the template does not render conversations as prefixes of each other")
            # The answer and its end-of-turn token, not the template's trailing newline.
            spans.append((len(head), len(upto.rstrip())))
            prompt_end = len(head)
        return full, spans, prompt_end, True

    def _encode(self, row: Row) -> tuple[list[int], list[int], int]:
        full, spans, prompt_end, templated = self._texts(row)
        if self.cfg.train_on == "all":
            spans = [(0, len(full))]
        enc = self.tok(full, add_special_tokens=not templated, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        labels, prompt_len = [], 0
        for tok_id, (start, stop) in zip(ids, enc["offset_mapping"], strict=True):
            trained = stop > start and any(stop > a and start < b for a, b in spans)
            labels.append(tok_id if trained else IGNORE)
            if stop <= prompt_end:
                prompt_len += 1
        return ids, labels, prompt_len

    def __call__(self, row: Row) -> Example | None:
        ids, labels, prompt_len = self._encode(row)
        max_len = self.cfg.max_seq_len
        if len(ids) > max_len:
            if self.cfg.overlong == "error":
                raise DataError(f"{row.where}: {len(ids)} tokens exceeds data.max_seq_len={max_len} (data.overlong=error)")
            if self.cfg.overlong == "drop" or all(x == IGNORE for x in labels[:max_len]):
                self.stats.dropped += 1  # dropped by config, or truncation would leave no trained token
                return None
            ids, labels, prompt_len = ids[:max_len], labels[:max_len], min(prompt_len, max_len)
            self.stats.truncated += 1
        if all(x == IGNORE for x in labels[1:]):
            raise DataError(f"{row.where}: nothing to train on (the answer renders to no tokens)")
        example = Example(ids, labels, prompt_len)
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


def build_examples(rows: list[Row], renderer: Renderer, what: str) -> list[Example]:
    examples = [ex for ex in (renderer(r) for r in rows) if ex is not None]
    if not examples:
        raise DataError(f"data: no {what} sample is left after tokenization (all longer than data.max_seq_len?)")
    return examples
