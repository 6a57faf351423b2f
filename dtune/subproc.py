"""Run a command under a hard time limit that covers its whole process tree.

``subprocess.run(..., timeout=...)`` kills only the child it started. A launcher such as torchrun starts its workers
in sessions of their own; killed at the limit, it leaves them running, holding the GPU and the output pipe, and
``run`` then waits for that pipe to close: the time limit does not hold (seen on an H200: a ZeRO-3 worker kept a
benchmark stage alive five minutes past its limit). :func:`run_bounded` kills every descendant and never waits on
the pipe past the limit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and all its descendants, those in sessions of their own included."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # what is left of its process group


def run_bounded(
    cmd: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> tuple[int | None, str]:
    """Run ``cmd`` (stdout and stderr together), passing each output line to ``on_line`` as it comes.

    Returns:
        (exit status, or None if it ran past ``timeout`` seconds and was killed; everything it printed).
        Whatever the command leaves running after it exits is killed too.
    """
    out: list[str] = []
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        code = None
    kill_tree(proc.pid)
    reader.join(timeout=5)  # a killed descendant's pipe closes at once; never wait longer than this
    return code, "".join(out)
