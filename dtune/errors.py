"""User-facing errors: raised for bad input, printed as one clear line by the CLI (no traceback)."""

import contextlib
import os
import sys
from collections.abc import Iterator


class DtuneError(Exception):
    """An error the user can fix: its message names the file, line or config field at fault."""


class ConfigError(DtuneError):
    """A config value is missing, misspelt, of the wrong type or out of range."""


class DataError(DtuneError):
    """A data file is missing, empty or malformed."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a DtuneError into one line on stderr and exit status 2 (full traceback with HYDRA_FULL_ERROR=1)."""
    try:
        yield
    except DtuneError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stdout.flush()
        print(f"dtune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
