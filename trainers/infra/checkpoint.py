"""Checkpoints that are never half-written, and exact resumption from them.

A checkpoint is a directory `checkpoints/step-000100/` holding

    trainable.safetensors   the trainable weights only (LoRA: the adapter; full fine-tuning: all)
    optimizer.pt            the optimizer state (8-bit AdamW quantised state included)
    state.pt                step, scheduler, RNG states (python, numpy, torch, cuda), the recipe's state
    manifest.json           size and sha256 of each file above, written last

A sharded model (several processes, full fine-tuning) writes its weights and
optimizer state as `sharded/` instead, one file per rank through
torch.distributed.checkpoint (trainers/infra/sharded_checkpoint.py); the manifest
then lists those files, and any number of processes can resume it.

It is written to a temporary directory next to its final place and renamed
when complete: a crash leaves either the old set of checkpoints or the new
one, never a partial directory that looks valid. Older checkpoints are
deleted only once the new one is in place. A checkpoint damaged afterwards
(a file truncated, missing or changed: a full disk, a node crash before the
data reached the disk, a stray edit) fails its manifest and is skipped on
resume, with one line saying so, for the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.files import atomic_directory, atomic_write_text, torch_save
from twophase.trainers.infra import sharded_checkpoint
from twophase.trainers.infra.sharding import is_sharded

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.pt")
REQUIRED_SHARDED = ("state.pt", f"{sharded_checkpoint.SHARDED_DIR}/.metadata")
MANIFEST = "manifest.json"

# Tests stop a run at a named moment of a step or a save (with a signal, or as a kill would) through these
# hooks, each called as hook(name, step); without hooks a moment costs one function call.
MOMENT_HOOKS: list = []


def moment(name: str, step: int) -> None:
    for hook in MOMENT_HOOKS:
        hook(name, step)


def save_checkpoint(checkpoint_dir: Path, step: int, model, optimizer, scheduler, rng: dict, recipe_state: dict) -> Path:
    """Write checkpoints/step-N: its files, then their manifest, then one rename makes it visible.

    An intact checkpoint of the same step is kept as it is (it holds the same state); a damaged one
    is moved aside first, so there is never a moment when a valid checkpoint has been given up.
    """
    final = Path(checkpoint_dir) / f"step-{step:06d}"
    if is_sharded(model):  # every rank calls this, and writes its shards
        return _save_sharded(final, step, model, optimizer, scheduler, rng, recipe_state)
    if final.exists():
        if checkpoint_problem(final) is None:
            return final
        _move_aside(final)
    with atomic_directory(final) as tmp:
        save_file(trainable_state_dict(model), str(tmp / "trainable.safetensors"))
        moment("save:weights", step)
        torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        moment("save:optimizer", step)
        torch_save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng, "recipe": recipe_state}, tmp / "state.pt")
        moment("save:state", step)
        _write_manifest(tmp, step, CHECKPOINT_FILES)
        moment("save:manifest", step)
    moment("save:renamed", step)
    return final


def _save_sharded(final: Path, step: int, model, optimizer, scheduler, rng: dict, recipe_state: dict) -> Path:
    """All ranks write their shards into one temporary directory; rank 0 adds state.pt and the manifest and renames it."""
    intact = distributed.broadcast_from_main(final.exists() and checkpoint_problem(final) is None)
    if intact:
        return final
    tmp = sharded_checkpoint.make_temporary_directory(final)
    try:
        kept = sharded_checkpoint.write_shards(tmp, model, optimizer)
        distributed.barrier()  # every rank's shards are on disk
        moment("save:weights", step)
        if distributed.is_main():
            torch_save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng, "recipe": recipe_state,
                        "sharded": kept}, tmp / "state.pt")  # fmt: skip
            moment("save:state", step)
            _write_manifest(tmp, step, _files_under(tmp))
            moment("save:manifest", step)
            if final.exists():
                _move_aside(final)
            os.replace(tmp, final)
    except BaseException:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()  # no rank goes on before the checkpoint is in place
    moment("save:renamed", step)
    return final


def _files_under(directory: Path) -> list[str]:
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)


def _write_manifest(directory: Path, step: int, names) -> None:
    """manifest.json: the size and sha256 of every file of the checkpoint; written last."""
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)} for name in names}
    atomic_write_text(directory / MANIFEST, json.dumps({"step": step, "files": files}, indent=2) + "\n")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path`, or None when every file matches its manifest.

    A checkpoint without a manifest cannot be verified (a changed or half-written file would go
    unnoticed), so it counts as damaged; so does one whose manifest names another step.
    """
    path = Path(path)
    if not (path / MANIFEST).exists():
        return f"{MANIFEST} is missing, so its files cannot be verified"
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files, step = manifest["files"], int(manifest["step"])
        required = REQUIRED_SHARDED if "state.pt" in files and "trainable.safetensors" not in files else CHECKPOINT_FILES
        expected = {name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in (*required, *files)}
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    if step != checkpoint_step(path):
        return f"its {MANIFEST} is of step {step}, not {checkpoint_step(path)}"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size:,} bytes, its manifest says {size:,}"
        if sha256_of(file) != digest:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(Path(path).name).group(1))


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints, oldest first (temporary directories start with a dot and never match); not verified."""
    if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise UserError(f"{checkpoint_dir} is not a directory, so it cannot hold this run's checkpoints; "
                        f"move it away (or choose another out_dir) and rerun")  # fmt: skip
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [p for p in Path(checkpoint_dir).iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all); each is renamed away first, then deleted."""
    for old in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        aside = _move_aside(old)
        moment("prune:moved", checkpoint_step(old))
        shutil.rmtree(aside, ignore_errors=True)


def _move_aside(path: Path) -> Path:
    """Rename `path` to a temporary name (one atomic step); a later start removes it if this process cannot."""
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


def restore_newest(checkpoint_dir: Path, model, optimizer, scheduler, report=print) -> tuple[Path, dict] | None:
    """Load the newest intact checkpoint into model, optimizer and scheduler; returns (its path, its state).

    A damaged checkpoint (a file missing, truncated or changed; one that cannot be read) is
    skipped with one line through `report`, and the next older one is tried. Nothing is changed
    until a checkpoint has been read whole. None when there is no intact checkpoint.
    """
    for path in reversed(list_checkpoints(checkpoint_dir)):
        problem = distributed.broadcast_from_main(checkpoint_problem(path) if distributed.is_main() else None)
        if problem is None:
            try:
                if sharded_checkpoint.is_sharded_checkpoint(path):
                    return path, _restore_sharded(path, model, optimizer, scheduler)
                contents = _read_checkpoint(path)
                if contents["state"].get("step") != checkpoint_step(path):
                    problem = f"its state.pt is of step {contents['state'].get('step')}, not {checkpoint_step(path)}"
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to read means the files are damaged
                problem = f"it cannot be read: {_first_line(err)}"
        if problem is not None:
            report(f"checkpoint {path} is damaged ({problem}); skipping it")
            continue
        if is_sharded(model):
            raise UserError(
                f"checkpoint {path} was written by one process; resume it with one process (a checkpoint of several "
                f"processes resumes at any number)"
            )
        _apply_checkpoint(path, contents, model, optimizer, scheduler)
        return path, contents["state"]
    return None


def _restore_sharded(path: Path, model, optimizer, scheduler) -> dict:
    """A checkpoint of several processes, read by this run's processes (any number, one included)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    sharded_checkpoint.read_shards(path, model, optimizer, state["sharded"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def _read_checkpoint(path: Path) -> dict:
    path = Path(path)
    return {
        "weights": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
        "state": torch.load(path / "state.pt", map_location="cpu", weights_only=False),
    }


def _apply_checkpoint(path: Path, contents: dict, model, optimizer, scheduler) -> None:
    weights, params = contents["weights"], dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing or set(weights) - set(params):
        raise UserError(
            f"checkpoint {path} does not match the model (first missing: {(missing or sorted(set(weights) - set(params)))[0]}); "
            f"resume with the model and LoRA settings it was trained with"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(contents["optimizer"])
    scheduler.load_state_dict(contents["state"]["scheduler"])


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
