"""Tiny random models of the families users bring, each with its family's chat template written for the tests.

Every model uses the SmolLM2 tokenizer with its family's special tokens added (so an end-of-turn marker is one
token, as in the real tokenizer) and a template written here after the family's published one: what each one does
that breaks naive trainers is noted beside it. Built in a second or two per family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Llama 3: BOS text in the template, header tokens, content trimmed, <|eot_id|> ends a turn; eos is another token.
LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# Qwen2.5: ChatML with a default system prompt, Hermes-style tools (<tools> in the system turn, <tool_call> JSON in
# the assistant turn, tool results as user turns); eos <|endoftext|> differs from the end of turn <|im_end|>.
QWEN2 = (
    "{%- if messages and messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- else %}{%- set sys = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|im_start|>system\n' + sys }}"
    "{%- if tools %}{{- '\n\n# Tools\n<tools>' }}{%- for t in tools %}{{- '\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\n</tools>' }}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'user' or (m['role'] == 'assistant' and not m.get('tool_calls')) %}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- elif m['role'] == 'assistant' %}{{- '<|im_start|>assistant' }}{%- if m['content'] %}{{- '\n' + m['content'] }}{%- endif %}"
    "{%- for tc in m['tool_calls'] %}{%- if tc['function'] is defined %}{%- set tc = tc['function'] %}{%- endif %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + tc['name'] + '\", \"arguments\": ' + (tc['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif m['role'] == 'tool' %}{{- '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen3 (the template): an empty think block on the last assistant turn, earlier reasoning dropped -- so a
# conversation's prefix does not render as a prefix of the conversation.
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{%- set body = m['content'] -%}{%- set thought = '' -%}"
    "{%- if '</think>' in body -%}{%- set thought = body.split('</think>')[0].split('<think>')[-1].strip('\n') -%}"
    "{%- set body = body.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and (loop.last or thought) -%}"
    "{{- '<|im_start|>assistant\n<think>\n' + thought + '\n</think>\n\n' + body + '<|im_end|>\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\n' + body + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Gemma 3: BOS in the template, no system role (a system message is folded into the first user turn), roles must
# alternate starting with the user, the assistant is "model", content trimmed.
GEMMA3 = (
    "{{- bos_token }}{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' }}{%- endif -%}"
)

# Mistral v0.1: no system role at all (refused), strict alternation, the answer ends with eos; no generation prompt.
MISTRAL = (
    "{{- bos_token }}{%- for m in messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m['role'] == 'user' %}{{- '[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}{%- endfor %}"
)

# Phi-3: <|end|> ends a turn, and a conversation without a generation prompt ends with eos.
PHI3 = (
    "{%- for m in messages %}{{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)


@dataclass
class Family:
    name: str
    template: str
    special: list[str]
    """Special tokens the family's tokenizer has (added to the SmolLM2 tokenizer)."""
    bos: str | None
    eos: str
    end_of_turn: str
    config: dict[str, Any] = field(default_factory=dict)
    system: bool = True
    """Whether the template takes a system message."""


SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        LLAMA3,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        {"model_type": "llama", **SMALL, "tie_word_embeddings": True},
    ),
    "qwen2": Family(
        "qwen2",
        QWEN2,
        ["<tool_call>", "</tool_call>"],
        None,
        "<|endoftext|>",
        "<|im_end|>",
        {"model_type": "qwen2", **SMALL, "tie_word_embeddings": False},
    ),
    "qwen3": Family(
        "qwen3",
        QWEN3,
        ["<think>", "</think>"],
        None,
        "<|endoftext|>",
        "<|im_end|>",
        {"model_type": "qwen3", **SMALL, "head_dim": 16, "tie_word_embeddings": True},
    ),
    "gemma3": Family(
        "gemma3",
        GEMMA3,
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        # 4 layers, 3 of them sliding with a window of 8 tokens (the packing case); tied embeddings.
        {
            "model_type": "gemma3_text",
            **SMALL,
            "num_hidden_layers": 4,
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "tie_word_embeddings": True,
        },
        system=False,
    ),
    "mistral": Family(
        "mistral",
        MISTRAL,
        ["<s>", "</s>", "[INST]", "[/INST]"],
        "<s>",
        "</s>",
        "</s>",
        {"model_type": "mistral", **SMALL, "sliding_window": 8, "tie_word_embeddings": False},
        system=False,
    ),
    "phi3": Family(
        "phi3",
        PHI3,
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        None,
        "<|endoftext|>",
        "<|end|>",
        {"model_type": "phi3", **SMALL, "tie_word_embeddings": False},
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        QWEN3,
        ["<think>", "</think>"],
        None,
        "<|endoftext|>",
        "<|im_end|>",
        {
            "model_type": "qwen3_moe",
            **SMALL,
            "head_dim": 16,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": False,
        },
    ),
}


def build_family(name: str, out: Path, seed: int = 0) -> Path:
    """A tiny random model of family ``name`` with its template, saved as a Hugging Face directory at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dtune.assets import smollm2_tokenizer

    fam = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": fam.special}, replace_extra_special_tokens=False)
    tok.eos_token = fam.eos
    tok.bos_token = fam.bos
    tok.pad_token = fam.eos
    tok.chat_template = fam.template
    settings = dict(fam.config)
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **settings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "teal",
    "plum",
    "river",
    "stone",
    "cloud",
    "light",
    "north",
    "quiet",
    "amber",
    "seven",
]


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` two-turn chat records of 5-30 words per turn (a deterministic mix of a small vocabulary)."""
    import random

    rng = random.Random(seed)

    def words() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))

    return [{"messages": [{"role": "user", "content": words()}, {"role": "assistant", "content": words()}]} for _ in range(n)]
