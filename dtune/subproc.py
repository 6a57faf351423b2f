"""Run a command under a hard time limit that covers its whole process tree.

``subprocess.run(..., timeout=...)`` kills only the child it started. A launcher such as torchrun starts its workers
in sessions of their own; killed at the limit, it leaves them running, holding the GPU and the output pipe, and
``run`` then waits for that pipe to close: the time limit does not hold (seen on an H200: a ZeRO-3 worker kept a
benchmark stage alive five minutes past its limit). :func:`run_bounded` kills every descendant it has seen and never
waits on the pipe past the limit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_tree(pid: int, known: dict[int, psutil.Process] | None = None) -> None:
    """SIGKILL process ``pid``, its descendants, and the processes in ``known`` (descendants seen earlier, which
    may have been re-parented since); psutil checks each one's identity, so a reused pid is never hit."""
    procs = {p.pid: p for p in _descendants(pid)}
    procs.update(known or {})
    with contextlib.suppress(psutil.Error):
        procs[pid] = psutil.Process(pid)
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # what is left of its process group


def run_bounded(
    cmd: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    on_line: Callable[[str], None] | None = None,
    last_words: int | None = None,
    grace: float = 3.0,
) -> tuple[int | None, str]:
    """Run ``cmd`` (stdout and stderr together, decoded as UTF-8 with bad bytes replaced), passing each output line
    to ``on_line`` as it comes.

    At the time limit, if ``last_words`` is a signal (e.g. ``signal.SIGABRT``, on which Python with
    ``PYTHONFAULTHANDLER=1`` prints every thread's stack), it goes to the whole tree ``grace`` seconds before the
    kill: the output then says where a command that hung was stuck.

    Returns:
        (exit status, or None if it ran past ``timeout`` seconds and was killed; everything it printed).
        Whatever the command leaves running after it exits is killed too.
    """
    out: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + max(timeout, 0.1)
    code: int | None = None
    while True:
        # Descendants are noted while the command runs: once it exits, those in their own sessions are re-parented
        # and could no longer be found from its pid.
        seen.update((p.pid, p) for p in _descendants(proc.pid))
        try:
            code = proc.wait(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                break
    if code is None and last_words is not None:
        for p in [*seen.values(), *_descendants(proc.pid)]:
            with contextlib.suppress(psutil.Error):
                p.send_signal(last_words)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, last_words)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    kill_tree(proc.pid, seen)
    if code is None:
        proc.wait()
    reader.join(timeout=5)  # a killed descendant's pipe closes at once; never wait longer than this
    return code, "".join(out)
