"""``dtune generate``: the trained model answers prompts, streamed as it writes.

The base loads in 4-bit exactly as it was trained, the adapter on top; each prompt is rendered as training rendered
prompts (the tokenizer's chat template, or ChatML when it has none, with the run's system prompt; plain text with
``--no-chat-template`` or when the run trained without a template),
and the answer is streamed to stdout token by token. Prompts come from ``--prompt`` (repeatable) or a JSONL file
(``{"prompt": ...}`` per line, or a chat, ShareGPT or alpaca record, its reference answer optional and left out);
``--out`` writes prompt/answer pairs as JSONL.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dtune.adapters import load_trained, locate_args, trained_parser
from dtune.data.formats import SHAREGPT_ROLES, row_from_obj
from dtune.data.render import Renderer
from dtune.errors import DataError, user_errors
from dtune.model import load_tokenizer
from dtune.units import DTYPES

Prompt = str | dict[str, Any]
"""A user message, or a conversation the model's answer continues: ``{"messages": [...], "tools": [...]}`` (tools
only where the record defines some), the messages as training's parser gives them to the chat template."""

PLACEHOLDER = "(the answer to generate)"
"""Stands in for a record's missing answer so that the training formats' parser reads it; dropped again."""


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts of a JSONL file, one a line: ``{"prompt": TEXT or [messages]}``, a chat/ShareGPT record (its
    system turn, tools and earlier turns kept; a final assistant reply, the reference answer, dropped), an alpaca
    record (``output`` optional), a preference or KTO row (its prompt as training splits it, an Anthropic HH-RLHF
    transcript's too; the record's ``tools`` and ``system`` kept), or ``{"text": ...}`` (plain text). A prompt that is
    one message, or a string with ``tools``, is a conversation as training reads it. Raises DataError naming file and line."""
    prompts: list[Prompt] = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if {"chosen", "rejected"} <= set(obj) or ("completion" in obj and isinstance(obj.get("label"), bool)):  # pairs, KTO
            row = row_from_obj(obj, where, "preference" if "chosen" in obj else "kto")
            prompts.append({"messages": row.messages[: row.prompt_turns], **({"tools": row.tools} if row.tools else {})})
            continue
        if isinstance(obj.get("prompt"), dict) or (isinstance(obj.get("prompt"), str) and obj.get("tools")):
            # one message, or a question with tools: a conversation as training reads it (the tools rendered)
            obj = {
                **obj,
                "prompt": [obj["prompt"] if isinstance(obj["prompt"], dict) else {"role": "user", "content": obj["prompt"]}],
            }
        if isinstance(obj.get("prompt"), list):  # a conversational prompt (TRL's and dtune's preference rows)
            obj = {"messages": obj["prompt"], **({"tools": obj["tools"]} if "tools" in obj else {})}
        if isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj.get("text"), str) and not ({"messages", "conversations", "instruction"} & set(obj)):
            prompts.append(obj["text"])
        else:
            prompts.append(_conversation_prompt(obj, where))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _conversation_prompt(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The messages before the answer of a chat, ShareGPT or alpaca record (parsed as training parses them)."""
    fmt = next((f for key, f in (("messages", "chat"), ("conversations", "sharegpt")) if key in obj), "alpaca")
    key = {"chat": "messages", "sharegpt": "conversations"}.get(fmt)
    if key and isinstance(obj[key], list) and obj[key]:
        last = obj[key][-1] if isinstance(obj[key][-1], dict) else {}
        role = last.get("role") if fmt == "chat" else SHAREGPT_ROLES.get(str(last.get("from")))
        if role != "assistant":  # no reference answer: a placeholder is parsed in its place and dropped below
            answer = {"role": "assistant", "content": PLACEHOLDER} if fmt == "chat" else {"from": "gpt", "value": PLACEHOLDER}
            obj = {**obj, key: [*obj[key], answer]}
    elif fmt == "alpaca" and "output" not in obj:
        obj = {**obj, "output": PLACEHOLDER}
    row = row_from_obj(obj, where, fmt)
    return {"messages": row.messages[:-1], **({"tools": row.tools} if row.tools else {})}


def render(renderer: Renderer, prompt: Prompt, system: str | None, where: str = "") -> tuple[str, bool]:
    """The text the model sees before its answer, as training rendered prompts; and whether it is templated.
    ``system`` goes first unless the conversation has its own system turn. Raises DataError (naming ``where``) for
    a conversation an untemplated run cannot continue (no user turn) or that the chat template refuses."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt["messages"]
    tools = None if isinstance(prompt, str) else prompt.get("tools")
    if not renderer.templated:  # trained on plain text: the last user turn is the text to continue
        if not (users := [m["content"] for m in messages if m["role"] == "user"]):
            raise DataError(f"{where}: this run trained on plain text; the prompt needs a user turn to continue")
        return users[-1], False
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return renderer.chat(messages, generation_prompt=True, where=where, tools=tools), True


def shown(prompt: Prompt) -> str:
    """A prompt as the stream shows it: its last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt["messages"]) if m["role"] == "user"), "")


def end_of_turn(renderer: Renderer) -> str | None:
    """What the chat template writes after an assistant's answer (``<|im_end|>`` for ChatML): training taught the model
    to emit it, so generation stops there. None for plain-text runs (they stop at the tokenizer's eos)."""
    return renderer.end_of_turn if renderer.templated else None


def generate(
    model: Any,
    renderer: Renderer,
    prompts: list[Prompt],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system: str | None = None,
    stream: Any = None,
    precision: str = "fp32",
) -> list[str]:
    """Answers to ``prompts`` (greedy when temperature is 0), each streamed to ``stream`` if given. ``renderer``:
    dtune.data.Renderer of the run's tokenizer and data settings (the prompts are rendered as in training).
    ``precision``: the run's ``train.precision``; 16-bit runs generate under autocast, as training computed (the
    residual stream is fp32, the frozen 16-bit layers take it cast)."""
    tokenizer = renderer.tok
    stop = end_of_turn(renderer)
    answers = []
    device = next(model.parameters()).device
    for i, prompt in enumerate(prompts, start=1):
        text, templated = render(renderer, prompt, system, f"prompt {i}")
        ids = torch.tensor([renderer.encoder.prompt(text, templated)], device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        streamer = None
        if stream is not None:
            stream.write(f"\n>>> {shown(prompt)}\n")
            streamer = _streamer(tokenizer, stream)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        if stop:
            sampling.update(stop_strings=[stop], tokenizer=tokenizer)
        autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
        with torch.no_grad(), autocast:
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        text = text.split(stop)[0] if stop else text
        for special in tokenizer.all_special_tokens:  # eos, padding
            text = text.replace(special, "")
        answers.append(text.strip())
    return answers


def _streamer(tokenizer: Any, stream: Any) -> Any:
    """transformers' TextStreamer, writing to ``stream`` instead of print()."""
    from transformers import TextStreamer

    class ToStream(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = trained_parser("dtune generate", __doc__.split("\n\n")[0])
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="JSONL file of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--system", help="system message before each prompt")
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    parser.add_argument("--out", help="write {prompt, answer} JSONL here")
    args = parser.parse_args(argv)

    with user_errors():
        prompts = list(args.prompt) + (read_prompts(Path(args.prompts)) if args.prompts else [])
        if not prompts:
            raise DataError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
        trained = locate_args(args)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_trained(trained, device, args.allow_pickle)
        if args.no_chat_template:
            trained.cfg.data.chat_template = False
        renderer = Renderer(load_tokenizer(trained.cfg), trained.cfg.data)
        system = args.system if args.system is not None else trained.cfg.data.system_prompt
        answers = generate(
            model,
            renderer,
            prompts,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            system,
            sys.stdout,
            trained.cfg.train.precision,
        )
        if args.out:
            with open(args.out, "w") as f:
                for prompt, answer in zip(prompts, answers, strict=True):
                    f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    return 0
