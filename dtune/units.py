"""Units: the precision names of the config and their dtypes, and byte sizes written by people."""

from __future__ import annotations

import re

import torch

from dtune.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``train.precision`` (and ``--dtype``) -> torch dtype."""

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
"""``train.precision`` -> Accelerate's ``mixed_precision``."""

CONFIG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""``train.precision`` -> the ``dtype`` string a transformers ``config.json`` records."""

GiB = 2**30

_POWER = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_bytes(text: str, what: str = "size", default_unit: str = "") -> int:
    """Bytes from a size as people write it: ``80GiB`` and ``24G`` are binary (2**30), ``40GB`` is decimal (10**9),
    ``512K``/``4MiB``/``1024`` (a plain number: ``default_unit``, bytes unless given, e.g. ``"G"``).

    Raises :class:`~dtune.errors.ConfigError` naming ``what`` (the flag or config field) when ``text`` is not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)(B?)\s*", text, re.IGNORECASE)
    if not match or (match.group(3) and not match.group(2)):
        raise ConfigError(f"{what}: cannot read {text!r} as a size (e.g. 80GiB, 40GB, 24G, 512MiB)")
    number, prefix, binary, b = match.groups()
    prefix = prefix.upper() or ("" if b else default_unit.upper())
    decimal = bool(prefix) and bool(b) and not binary  # 40GB: SI; 40G and 40GiB: binary, as GPU memory is quoted
    return int(float(number) * (1000 if decimal else 1024) ** _POWER[prefix])
