"""Process-wide settings every dtune command makes once, at its start."""

from __future__ import annotations

import logging
import os
import warnings


def offline_defaults() -> None:
    """dtune never downloads at run time: models are local directories or built-ins (a user may still opt in)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_libraries() -> None:
    """Silence the libraries' per-load notices, which drown the progress bar and say nothing a user acts on."""
    import transformers  # heavy: imported by the commands that load a model, not by `dtune --help`

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # PEFT calls transformers' renamed gradient-checkpointing methods; the notice is theirs to act on, not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # (bitsandbytes' optional-kernel notice is silenced in dtune/__init__.py, before bitsandbytes is first imported.)


def to_log_files(logger: logging.Logger, text: str) -> None:
    """``text`` at INFO into the log files only (``dtune.log``, ``dtune_rank<N>.log``): for a line the console already
    shows above the progress bar."""
    if not logger.isEnabledFor(logging.INFO):
        return
    record = logger.makeRecord(logger.name, logging.INFO, "(dtune)", 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def console_warnings_only() -> None:
    """On ranks other than 0: the console shows warnings only (one voice per job; each rank's full log is in its
    file)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
