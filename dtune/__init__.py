"""dtune: QLoRA fine-tuning on multi-GPU clusters."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes looks for an optional CPU kernel package when it is first imported and says so at WARNING: a notice
# for its developers, printed before any dtune command could quiet it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
