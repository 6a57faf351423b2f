"""Preemption: stop at the end of the step in hand, checkpoint, exit with a code that launch scripts requeue on.

Slurm warns a job before it ends it (``--signal=USR1@180`` for a time limit, SIGTERM on preemption); torchrun
forwards the signals it is told to (``--signals-to-handle``, see launch/torchrun.sh); submitit sends USR2. On any
of them dtune sets a flag; the training loop asks all ranks after each step (a signal may reach some ranks only),
writes a checkpoint and leaves with :data:`REQUEUE_EXIT`. A handler that was installed before ours (submitit's,
which requeues the job itself) is called after the checkpoint is written.

A stop signal that comes while dtune starts (imports, config, the process group: before the loop takes the signals
over) is recorded from the process's first line on (:func:`record_early_signals`, ``dtune train`` and ``python -m
dtune.train``), and the run stops before it loads anything, as a preempted one: exit 75, requeued.

Ctrl-C (SIGINT) in an interactive run stops the same way once training has begun (:meth:`Preemption.arm`) -- at
the step boundary, with a checkpoint -- but exits :data:`INTERRUPT_EXIT`, which no launch script requeues; before
that (downloading, tokenizing, loading: nothing to save), and at a second Ctrl-C, it stops at once
(KeyboardInterrupt).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from dtune.fsutil import atomic_write_text

log = logging.getLogger(__name__)

REQUEUE_EXIT = 75
"""Exit status of a run that stopped on a signal after writing its checkpoint (EX_TEMPFAIL: try again)."""

INTERRUPT_EXIT = 130
"""Exit status of a run stopped by Ctrl-C after writing its checkpoint (the shell's 128 + SIGINT): not requeued."""

SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")


_early: list[signal.Signals] = []


def _record(signum: int, frame: FrameType | None) -> None:
    if not _early:
        _early.append(signal.Signals(signum))


def record_early_signals(argv: list[str]) -> None:
    """From here until :class:`Preemption` takes over, the stop signals (SIGINT aside: Ctrl-C before training stops at
    once) are recorded instead of ending the process -- where nothing else handles them (the default action). A run
    that receives one stops as preempted as soon as the loop starts, before it loads anything. Not for a sweep
    (``argv``, the command's arguments, holds ``-m``/``--multirun``): its jobs may run in other processes
    (``launcher=slurm``), and a driver that only waits for them would never take the signal over, nor stop on it."""
    if {"-m", "--multirun"} & set(argv) or threading.current_thread() is not threading.main_thread():
        return
    for name in SIGNALS:
        sig = getattr(signal, name)
        if sig != signal.SIGINT and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _record)
    stop_with_launcher()


PR_SET_PDEATHSIG = 1


def stop_with_launcher(env: dict[str, str] | None = None) -> bool:
    """A worker of torchrun (``TORCHELASTIC_RUN_ID`` set) is sent SIGTERM when its torchrun dies without stopping it
    (SIGKILL, the out-of-memory killer): torchrun starts its workers in sessions of their own, so they trained on,
    orphaned, holding their GPUs and the output lock; now they stop as preempted (checkpoint, exit 75). One already
    orphaned (parent pid 1) signals itself. Linux (``prctl(PR_SET_PDEATHSIG)``); returns whether it is set."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def started_as_module(module: str) -> bool:
    """Whether this process is ``python [options] -m <module> ...`` (its package imports run before ``__main__``)."""
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b == module for a, b in itertools.pairwise(argv)) or f"-m{module}" in argv


class Preemption:
    """Context manager: while inside, the signals in ``SIGNALS`` request a stop instead of ending the process."""

    def __init__(self, signals: tuple[str, ...] = SIGNALS) -> None:
        self.signals = [getattr(signal, name) for name in signals]
        self.received: signal.Signals | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    def arm(self) -> None:
        """Training has begun: from here a Ctrl-C waits for the step boundary and a checkpoint."""
        self.armed = True

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (the user ends the run; it is not to be requeued)."""
        return self.received == signal.SIGINT

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and (self.received is not None or not self.armed):
            raise KeyboardInterrupt  # still setting up (nothing to save), or a second Ctrl-C: the user will not wait
        if self.received is None:
            self.received = signal.Signals(signum)
            again = "; Ctrl-C again to stop at once, without one" if signum == signal.SIGINT else ""
            log.warning("received %s: stopping after the current step to write a checkpoint%s", self.received.name, again)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        if _early and self.received is None:  # received while starting (record_early_signals)
            self.received = _early.pop()
            log.warning("received %s while starting: stopping before training", self.received.name)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def previous_handler(self) -> Callable[[int, FrameType | None], Any] | None:
        """The Python handler that our handler replaced for the signal received (e.g. submitit's), if any."""
        if self.received is None or self.received == signal.SIGINT:  # Python's own raises KeyboardInterrupt: not wanted
            return None
        previous = self._previous.get(self.received)
        return previous if callable(previous) and previous is not _record else None


class Preempted(Exception):
    """Raised by the training loop on a preemption signal, at ``step``: after writing its checkpoint (``saved``), or
    with nothing new to save (the signal came while the run was setting up; ``step`` None: while it was starting,
    before the checkpoint it resumes from was read)."""

    def __init__(
        self,
        step: int | None,
        received: signal.Signals | None,
        previous: Callable[[int, FrameType | None], Any] | None,
        interrupted: bool | None = None,
        saved: bool = True,
    ) -> None:
        super().__init__("preempted while starting" if step is None else f"preempted after step {step}")
        self.step, self.received, self.previous, self.saved = step, received, previous, saved
        self._interrupted = received == signal.SIGINT if interrupted is None else interrupted

    @property
    def signal_name(self) -> str:
        return self.received.name if self.received else "a signal received by another rank"

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C on any rank (the ranks agree): the user ends the run; it is not to be requeued."""
        return self._interrupted

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT if self.interrupted else REQUEUE_EXIT

    def chain(self) -> None:
        """Hand the signal on to the handler ours replaced (submitit's requeues the job and exits)."""
        if self.previous is not None and self.received is not None:
            self.previous(self.received, None)


STATUS_FILE_ENV = "DTUNE_STATUS_FILE"


def write_status(status: str, step: int | None, output_dir: str, signal_name: str | None = None) -> None:
    """Tell the launch script how the run ended (``done``, ``preempted`` or ``interrupted``), in the file named by
    $DTUNE_STATUS_FILE: torchrun's own exit status cannot say it (1 for any worker that did not exit 0). The first
    process of each node (every node's launch script reads its own; on a shared filesystem they write the same)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path or int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) != 0:
        return
    record = {"status": status, "step": step, "signal": signal_name, "output_dir": output_dir}
    atomic_write_text(path, json.dumps(record) + "\n")


def under_submitit() -> bool:
    """Started by submitit (hydra-submitit-launcher): it must see the task return to record its result."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))
