"""Writing files so that nothing is ever half-written: a temporary next to the target, then a rename.

Every file and directory twophase writes for a user goes through here (checkpoints,
models, configs, metrics, eval results, tables, scripts). A reader, or a run resumed
after a crash, sees the old version or the new one, never a mixture: `os.replace`
within one directory is atomic on POSIX file systems.

The temporaries are named so that a later run can recognise and delete the ones an
interrupted write left behind (`TEMPORARY_NAME`, `remove_stale_temporaries`):
`.NAME.XXXX.tmp` files and `.NAME.tmp-XXXX` / `.NAME.old-PID` directories.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

TEMPORARY_NAME = re.compile(r"^\..+\.(tmp|old)(-[A-Za-z0-9_]+|\d+)?$")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch_save(obj, Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def torch_save(obj, path: Path) -> None:
    # Through a Python file: a full disk then raises OSError(ENOSPC), not an opaque "file write failed".
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_directory(final: str | os.PathLike):
    """Context manager yielding a temporary directory that becomes `final` when the block succeeds."""
    return _AtomicDirectory(Path(final))


class _AtomicDirectory:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.tmp-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            # Replace an older copy: move it aside first so the new one lands in one rename.
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return False


def remove_stale_temporaries(directory) -> list[str]:
    """Delete what interrupted atomic writes left in `directory` (not below it); returns the names removed.

    Call it only while holding the directory (data/base/run_dir.py: owned): then no live run is writing them.
    """
    removed = []
    for entry in Path(directory).iterdir():
        if not TEMPORARY_NAME.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed
