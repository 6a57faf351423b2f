"""The ``dtune`` subcommands, one module each: argument parsing, the user-facing errors and the exit status; the
work itself is in the library modules they call."""
