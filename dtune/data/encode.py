"""Text to token ids and labels, from the character spans of it that are trained (see :mod:`dtune.data.render`)."""

from __future__ import annotations

import itertools
from typing import Any

from dtune.data.examples import IGNORE


class TextEncoder:
    """Tokenizes a rendered text and labels the tokens of its trained character spans.

    ``piecewise``: whether the tokenizer joins cleanly (text tokenized in pieces decodes to the pieces joined): the
    text is then tokenized piece by piece, cut where trained spans start and end; else whole, labelled through the
    tokens' character offsets.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.piecewise = self._joins_cleanly()
        self._fast = self._backend_agrees()
        self._appended = self._appended_count()

    def encode(
        self, full: str, spans: list[tuple[int, int]], prompt_end: int, templated: bool
    ) -> tuple[list[int], list[int], int]:
        """Token ids, labels and prompt length (tokens) of ``full``, whose characters in ``spans`` are trained and whose
        prompt ends at character ``prompt_end``; an untemplated text (``templated`` false) gets the tokenizer's BOS.

        Piecewise, the prompt's tokens are exactly those of the prompt tokenized alone -- what ``dtune generate``
        feeds (tokenizing the whole text can merge across the boundary: ``"\\n\\n"`` + ``"7"``). Tokenizers that
        prepend a space to every piece tokenize the whole text instead, and label the tokens that overlap a trained
        span.
        """
        if not self.piecewise:
            return self._encode_whole(full, spans, prompt_end, templated)
        cuts = sorted({0, len(full), prompt_end, *(x for span in spans for x in span)})
        pieces = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
        encoded = self.pieces([full[a:b] for a, b in pieces])
        if not templated:  # the tokenizer's own BOS, as generate gets it
            encoded[0] = self._leading_specials(full[pieces[0][0] : pieces[0][1]], encoded[0])
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = 0
        for (a, b), piece in zip(pieces, encoded, strict=True):
            trained = any(a >= lo and b <= hi for lo, hi in spans)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
            if b <= prompt_end:
                prompt_len = len(ids)
        return ids, labels, prompt_len

    def prompt(self, text: str, templated: bool) -> list[int]:
        """Token ids of a prompt alone, as training tokenized the prompt before an answer (what ``dtune generate``
        feeds): a templated prompt without special tokens (the template writes its own); an untemplated one with the
        tokenizer's BOS, but not the EOS an ``add_eos_token`` tokenizer appends (training never puts it there)."""
        plain = self.tok(text, add_special_tokens=False)["input_ids"]
        return plain if templated else self._leading_specials(text, plain)

    def _encode_whole(
        self, full: str, spans: list[tuple[int, int]], prompt_end: int, templated: bool
    ) -> tuple[list[int], list[int], int]:
        enc = self.tok(full, add_special_tokens=not templated, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        offsets = enc["offset_mapping"]
        if not templated and self._appended:  # an add_eos_token EOS: the text already ends in the eos it trains
            ids, offsets = ids[: -self._appended], offsets[: -self._appended]
        labels, prompt_len = [], 0
        for tok_id, (start, stop) in zip(ids, offsets, strict=True):
            trained = stop > start and any(stop > a and start < b for a, b in spans)
            labels.append(tok_id if trained else IGNORE)
            if stop <= prompt_end:
                prompt_len += 1
        return ids, labels, prompt_len

    def _leading_specials(self, text: str, plain: list[int]) -> list[int]:
        """``text`` as the tokenizer encodes it with its special tokens, less those it appends after the text (an
        ``add_eos_token`` EOS: an untemplated row's text ends in the eos it is trained to write, and the first piece
        is often the prompt): its BOS, as generate gets it. ``plain``: the text's ids without special tokens."""
        full = self.tok(text, add_special_tokens=True)["input_ids"]
        return full[: len(full) - self._appended] if self._appended and len(full) > len(plain) else full

    def _appended_count(self) -> int:
        """How many special tokens the tokenizer appends after a text it encodes with special tokens (0 for most;
        1 for ``add_eos_token`` tokenizers)."""
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return len(full) - start - len(plain)
        return 0

    def pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens: ``tokenizer(texts, add_special_tokens=False)``, through the
        Rust tokenizer's ``encode_batch_fast`` (no offsets: about a third less time per row) when that gives the
        same ids (checked at construction)."""
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _backend_agrees(self) -> Any:
        """The Rust tokenizer, when calling it directly tokenizes as the tokenizer does (after the tokenizer's own call
        has set its options: no truncation or padding, special tokens as configured); else None."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        probe = ["Hello, world!", " <|im_end|>\n\n", "  7 \u00e9\u4e2d\t", self.tok.eos_token or "", "x" * 300]
        slow = self.tok(probe, add_special_tokens=False)["input_ids"]
        fast = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=False)]
        return backend if fast == slow else None

    def _joins_cleanly(self) -> bool:
        """Whether text tokenized in pieces decodes to the pieces joined: not so for SentencePiece-style tokenizers
        that prepend a space to every text they tokenize (Llama 2, Mistral v0.1: ``"a"`` + ``"b"`` -> ``"a b"``)."""
        pieces = [self.tok(x, add_special_tokens=False)["input_ids"] for x in ("a", "b")]
        return self.tok.decode(pieces[0] + pieces[1]) == "ab"
