"""The manifest of a pipeline stage: what ran, from which code, when, and how it ended.

RUN_DIR/<stage>/manifest.json is rewritten atomically at every change of
status, so a reader (`twophase status`, a rerun, another job) always sees a
whole file. The status is one of

    pending      no manifest yet
    running      started; if no process runs it any more it was killed, and a rerun resumes it
    interrupted  stopped by Ctrl-C or SIGTERM (a training stage wrote a checkpoint first)
    failed       raised an error; `reason` says which, `traceback` where
    skipped      not run in this configuration; `reason` says why
    done         finished with every output in place: a rerun skips it
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from twophase.data.base.files import atomic_write_text

MANIFEST = "manifest.json"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "numpy")
REPO_ROOT = Path(__file__).resolve().parents[1]


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, or None when it has none (pending) or it cannot be read.

    Under torchrun every rank gets rank 0's reading, so all ranks decide alike what to run (rank 0 writes manifests).
    """
    if _under_torchrun():
        from twophase.data.base import distributed

        return distributed.broadcast_from_main(_read_manifest(stage_dir) if distributed.is_main() else None)
    return _read_manifest(stage_dir)


def _under_torchrun() -> bool:
    return os.environ.get("WORLD_SIZE", "1") != "1"


def _read_manifest(stage_dir: Path) -> dict | None:
    try:
        data = json.loads((Path(stage_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    if _under_torchrun() and os.environ.get("RANK", "0") != "0":
        return  # rank 0 writes the run's files
    atomic_write_text(Path(stage_dir) / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


def is_done(manifest: dict | None) -> bool:
    """Done, and every output it lists still exists (a deleted output means the stage must run again)."""
    if not manifest or manifest.get("status") != "done":
        return False
    return all(Path(path).exists() for path in manifest.get("outputs", {}).values())


def start_manifest(name: str, config: dict, seed: int | None, needs: list[str], earlier: dict | None) -> dict:
    """The manifest of a stage that starts now; `attempt` counts the runs of this stage in this run directory."""
    return {
        "stage": name,
        "status": "running",
        "config": config,
        "needs": needs,
        "seed": seed,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "versions": package_versions(),
        "command": " ".join(sys.argv),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "attempt": (earlier or {}).get("attempt", 0) + 1,
        "resumed_from": (earlier or {}).get("status"),  # running/interrupted/failed: this attempt continues it
        "started_at": now(),
        "finished_at": None,
        "seconds": None,
        "reason": None,
        "outputs": {},
    }


def redacted(value):
    """The value with every `*api_key*` entry hidden: run directories get shared, keys must not be."""
    if isinstance(value, dict):
        return {k: ("<hidden>" if "api_key" in str(k) and v else redacted(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def finish(manifest: dict, status: str, **fields) -> dict:
    finished = datetime.now(timezone.utc)
    started = datetime.fromisoformat(manifest["started_at"])
    return {**manifest, "status": status, "finished_at": finished.isoformat(timespec="seconds"),
            "seconds": round((finished - started).total_seconds(), 1), **fields}  # fmt: skip


def still_running_elsewhere(manifest: dict | None) -> bool:
    """True when the manifest says running and its process is alive on this host (not a killed run)."""
    if not manifest or manifest.get("status") != "running" or manifest.get("host") != socket.gethostname():
        return False
    pid = manifest.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None when there is no git checkout)."""
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return None if changes is None else bool(changes)


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def package_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
