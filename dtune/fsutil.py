"""Files that are either whole or absent, and one writer per output directory.

Every file or folder dtune publishes (checkpoints, adapters, merged models, caches, metrics rewrites, status files)
is written beside its destination under a temporary name, flushed to disk and renamed into place: a reader, or a run
resumed after a crash, sees the old version or the new one, never a part. A run holds :class:`OutputLock` on its
output directory for as long as it writes there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtune.errors import ConfigError

log = logging.getLogger(__name__)


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves (before the rename that publishes them)."""
    for item in [*sorted(path.rglob("*")), path]:
        fsync(item)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory, flushed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync(path.parent)
    return path


def moved_aside_name(dest: Path) -> str:
    """Where :func:`publish_dir` keeps the previous ``dest`` while it renames the new one in (see :func:`recover`)."""
    return f".{dest.name}.tmp-old-{os.getpid()}"


@contextlib.contextmanager
def staged_dir(dest: Path | str, mode: int | None = None) -> Iterator[Path]:
    """A fresh temporary directory beside ``dest`` to build into; published over ``dest`` when the block ends without
    an error (files flushed first), removed either way. The previous ``dest``, if any, is replaced. ``mode``: the
    directory's permissions (default: the temporary directory's own, 0o700)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    if mode is not None:
        tmp.chmod(mode)
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if dest.exists():
            old = dest.parent / moved_aside_name(dest)
            os.replace(dest, old)  # a kill before the next rename leaves the old copy whole: recover() puts it back
        os.replace(tmp, dest)
        fsync(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover(parent: Path) -> None:
    """Put back what a writer killed inside :func:`staged_dir` (between moving the old copy aside and renaming the
    new one in) left moved aside, and remove the temporary folders of killed writers."""
    for moved in parent.glob(".*.tmp-old-*"):
        final = parent / moved.name[1:].split(".tmp-old-")[0]
        if not final.exists():
            os.replace(moved, final)
        else:
            shutil.rmtree(moved, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folders) for the block; yield whether it had to wait
    for another holder (who has, typically, just built or fetched what the caller is after). The kernel drops the
    lock of a holder that dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        waited = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


LOCK_FILE = ".dtune.lock"


class OutputLock:
    """The one-writer lock of an output directory: a POSIX record lock (``fcntl.lockf``) on ``<dir>/.dtune.lock``.

    The kernel (on NFSv4 and Lustre with ``flock`` mounts, the file server) drops the lock when its holder dies, so
    a lock left by a killed run is taken over at once, safely (two runs cannot both win). The file names the holder
    (host, pid, start time) for the refusal message; it is never removed (removing would let two runs lock two
    different files of the same name).

    Raises :class:`~dtune.errors.ConfigError` from :meth:`acquire` when another live process holds the directory.
    """

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"train.output_dir: {self.path.parent} is in use by another run ({_describe(holder)}); wait for it to "
                "end or choose another train.output_dir"
            ) from None
        previous = _holder(fd)
        if previous and not _same_process(previous):
            log.info(
                "output dir %s: taking over from a run that ended without releasing it (%s)",
                self.path.parent,
                _describe(previous),
            )
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # an ended run leaves no holder: the next one has nothing to take over
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the record lock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _same_process(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
