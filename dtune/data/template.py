"""Chat-template helpers of the renderer (dtune.data.render): the markers that find each trained turn in a rendering,
and rendering plain messages straight through transformers' compiled template."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from dtune.errors import DataError

MARKER = "\ue000dtune\ue001"  # private-use characters: no dataset or template writes them


def direct_renderer(tok: Any, template: str, reference: Callable[..., str]) -> Callable[[list[dict[str, Any]], bool], str] | None:
    """``render(messages, generation_prompt)`` through transformers' own compiled template (its sandbox, filters
    and globals) with the arguments ``apply_chat_template`` gives it; or None.

    ``apply_chat_template`` spends more than half its time per call copying and normalizing the messages (message
    objects to dicts, None values dropped, strings rebuilt as plain ``str``, reasoning copied under other names),
    which changes nothing in plain messages (:func:`plain`); rendering those directly halves the time a row spends
    in the template (a third more rows/s in all). Taken only when transformers has the compile function
    (``transformers.utils.chat_template_utils._compile_jinja_template``, private: another version may lack it) and,
    on probe conversations (a system turn, several turns, non-ASCII text, the marker, with and without the
    generation prompt), renders what ``apply_chat_template`` renders and refuses what it refuses."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
    except Exception:  # another transformers, or a template that does not compile
        return None
    extra = dict(tok.special_tokens_map)

    def render(messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=generation_prompt, **extra)

    turns = [
        {"role": "user", "content": "Hi \u00e9\u4e2d 7"},
        {"role": "assistant", "content": " An answer.\n"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": MARKER},
    ]
    probes = [turns[:1], turns[:2], turns, [{"role": "system", "content": "Be brief."}, *turns]]
    for probe, generation_prompt in itertools.product(probes, (False, True)):
        try:
            expected: str | None = reference(probe, generation_prompt)
        except DataError:  # e.g. a template without a system turn: it must refuse the probe directly too
            expected = None
        try:
            got: str | None = render(probe, generation_prompt)
        except Exception:  # whatever the template raises
            got = None
        if got != expected:
            return None
    return render


def marker(j: int) -> str:
    """The marker of the j-th trained turn's content: private-use characters, which no dataset or template writes."""
    return f"\ue000dtune{j}\ue001"


def content_span(full: str, variant: str, marker: str) -> tuple[int, int] | None:
    """Where in ``full`` the content is that ``marker`` stands for in ``variant`` (the same conversation with that one
    content marked): what precedes and follows the marker precedes and follows it. None when the template wrote the
    marker other than once, or around it what it does not write around the content."""
    k = variant.find(marker)
    if k < 0 or variant.count(marker) != 1:
        return None
    before, after = variant[:k], variant[k + len(marker) :]
    if full.startswith(before) and full.endswith(after) and k <= len(full) - len(after):
        return k, len(full) - len(after)
    return None


def put_back(full: str, marked: str, contents: list[str]) -> list[tuple[int, int]] | None:
    """Where each content is in ``full``, from ``marked`` (the conversation with content j replaced by ``marker(j)``):
    each marker once and in order, and the contents put back in their places giving ``full`` exactly -- the template
    wrote every content as it is, whatever the others hold. None otherwise."""
    parts, spans, at, pos = [], [], 0, 0
    for j, content in enumerate(contents):
        sign = marker(j)
        k = marked.find(sign, pos)
        if k < 0 or marked.count(sign) != 1:
            return None
        parts += [marked[pos:k], content]
        at += k - pos
        spans.append((at, at + len(content)))
        at += len(content)
        pos = k + len(sign)
    parts.append(marked[pos:])
    return spans if "".join(parts) == full else None


def plain(messages: list[dict[str, Any]]) -> bool:
    """Whether ``apply_chat_template``'s normalization leaves ``messages`` as they are: dicts of ``str`` keys and
    values (no None, no nested objects), none of them a reasoning field (which it copies under other names)."""
    return all(
        type(m) is dict and all(type(k) is str and type(v) is str for k, v in m.items()) and not _REASONING.intersection(m)
        for m in messages
    )


_REASONING = frozenset({"reasoning_content", "thinking", "reasoning"})


def tool_name(tool: Any) -> str:
    fn = tool.get("function", tool) if isinstance(tool, dict) else tool
    return str(fn.get("name", "")) if isinstance(fn, dict) else ""
