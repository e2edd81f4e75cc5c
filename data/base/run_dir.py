"""Owning a run directory: one writer at a time, and nothing left behind by dead runs.

Training, evaluation and the pipeline each write into a directory of their
own (`out_dir`, `--out`, a stage of `run_dir`). `owned(directory)` holds a
lock on DIRECTORY/.twophase.lock (`fcntl.flock`) for as long as the run
lasts, so a second run on the same directory is refused at once with one line
naming the process that holds it, instead of both interleaving their logs.
The kernel drops the lock when its process ends, however it ends: the lock of
a killed run never needs cleaning up. The lock file itself stays (removing a
lock file while others may open it is a race); it records who holds it.

Once the lock is held, no other process writes here, so the leftovers of
killed runs can go: temporary files and folders of atomic writes
(`.NAME.tmp-*`, `.NAME.old-*`, `.NAME.*.tmp`, `.NAME.tmp<pid>`) are removed.

The directory is checked first: a path that is a file, or that cannot be
created or written, is one clear error before anything is written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.base.files import remove_stale_temporaries

LOCK_FILE = ".twophase.lock"


_held: dict[str, list] = {}  # real path -> [open lock file descriptor, nesting depth] of the locks this process holds


@contextmanager
def owned(directory, shared: bool = False):
    """Hold `directory` (created if needed) for the duration of the block; yields its Path.

    `shared=True` takes a shared lock: shared holders exclude an exclusive one but
    not each other (pipeline stages run side by side under one run directory).
    A process that already holds the directory may enter again (nested use).
    """
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 holds the directory for all ranks and writes in it
        yield Path(directory).expanduser()
        return
    path = usable_directory(directory)
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield path
        finally:
            _held[key][1] -= 1
        return
    descriptor, locked = _acquire(path, shared)
    _held[key] = [descriptor, 1]
    try:
        if locked and not shared:
            remove_stale_temporaries(path)
        yield path
    finally:
        del _held[key]
        os.close(descriptor)  # closing the file releases the lock


def usable_directory(directory) -> Path:
    """`directory` as a Path, created if missing; one UserError when it is a file or cannot be written."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a directory; choose a directory for the run's outputs")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent is a file
        raise UserError(f"cannot create {path}: a part of that path is a file; choose another directory") from None
    except OSError as err:
        raise UserError(f"cannot create {path} ({err.strerror}); choose a directory you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path} is not writable; choose a directory you can write to")
    return path


def _acquire(path: Path, shared: bool) -> tuple[int, bool]:
    """The open lock file and whether it is locked (False where the file system has no flock)."""
    try:
        descriptor = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot write in {path} ({err.strerror}); choose a directory you can write to") from None
    try:
        fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            # Some cluster file systems are mounted without flock: run, but say what is not guarded.
            print(f"warning: cannot lock {path / LOCK_FILE} ({err.strerror}): nothing stops a second run "
                  f"from writing this directory at the same time", file=sys.stderr)  # fmt: skip
            return descriptor, False
        holder = _read_holder(descriptor)
        os.close(descriptor)
        raise UserError(
            f"{path} is in use by {holder}: one run at a time may write a directory; "
            f"wait for it to end (or stop it), or choose another output directory"
        ) from None
    _write_holder(descriptor)
    return descriptor, True


def _write_holder(descriptor: int) -> None:
    """Who holds the lock, for the error of the next process that asks (one line)."""
    command = " ".join(os.path.basename(word) if i == 0 else word for i, word in enumerate(sys.argv))[:300]
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    line = f"process {os.getpid()} on {socket.gethostname()} ({command or 'python'}, since {since})\n"
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, line.encode("utf-8", errors="replace"), 0)


def _read_holder(descriptor: int) -> str:
    text = os.pread(descriptor, 1000, 0).decode("utf-8", errors="replace").strip()
    return text.splitlines()[0] if text else "another process"
