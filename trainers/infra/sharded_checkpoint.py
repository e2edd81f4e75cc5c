"""Checkpoints of a sharded (FSDP2) model: every rank writes its shards with torch.distributed.checkpoint (DCP).

A sharded checkpoint is a directory `checkpoints/step-000100/` holding

    sharded/            DCP: one file of shards per rank and `.metadata`, which says where each piece of
                        every weight and optimizer tensor is: a reader with any number of ranks (one included)
                        takes the pieces it needs (resharding)
    state.pt            step, scheduler, the optimizer's hyper-parameters, RNG states, the recipe's state (rank 0)
    manifest.json       size and sha256 of each file above, written last (trainers/infra/checkpoint.py)

Atomic as the one-process checkpoint is: rank 0 makes the temporary directory and
tells the others its name, all ranks write their shards into it, and after a
barrier rank 0 writes state.pt and the manifest and renames it into place.

The optimizer of a sharded model keeps each parameter's state for its local shard
(trainers/infra/sharding.py: LocalShards). State tensors of the shard's shape are saved as
DTensors laid out like their parameter, so they reshard with it. Other state (the
block-wise scales of the 8-bit AdamW, whose blocks follow the shard's layout) is
saved per rank and can only be resumed with the same number of ranks.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from twophase.data.base import distributed
from twophase.data.base.errors import UserError

SHARDED_DIR = "sharded"


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def make_temporary_directory(final: Path) -> Path:
    """Rank 0 makes the temporary directory (named so a later run recognises it as a leftover); all ranks get its name."""
    name = None
    if distributed.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        name = tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    return Path(distributed.broadcast_from_main(name))


def write_shards(directory: Path, model, optimizer) -> dict:
    """Every rank: its shards of the weights and the optimizer state into directory/sharded. Returns what state.pt keeps."""
    dcp.save(_state(model, optimizer), checkpoint_id=str(directory / SHARDED_DIR))
    return {"param_groups": [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups],
            "world_size": distributed.world_size()}  # fmt: skip


def read_shards(path: Path, model, optimizer, saved: dict) -> None:
    """Load the weights and optimizer state of a sharded checkpoint into this run's model (sharded or not)."""
    _materialise_state(optimizer)
    state = _state(model, optimizer)
    per_rank = [k for k in state["optimizer"] if k.startswith("rank")]
    if per_rank and saved.get("world_size") != distributed.world_size():
        raise UserError(
            f"checkpoint {path} holds 8-bit optimizer state of {saved.get('world_size')} process(es); resume it with "
            f"that many, or train with optimizer adamw to resume at any number"
        )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")  # it is
        dcp.load(state, checkpoint_id=str(Path(path) / SHARDED_DIR))
    _write_back(optimizer, model, state["optimizer"])
    for group, kept in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(kept)


def _state(model, optimizer) -> dict:
    """{"model": name -> weight, "optimizer": name.state -> tensor}, with names the same at any number of ranks."""
    params = dict(model.named_parameters())
    weights = {name: p for name, p in params.items() if p.requires_grad}
    states = {}
    for name, key, local in _optimizer_entries(model, optimizer):
        value = optimizer.state[local][key]
        states[_optimizer_key(name, key, params[name], value)] = _as_saved(value, params[name])
    return {"model": weights, "optimizer": states}


def _optimizer_entries(model, optimizer) -> list[tuple[str, str, torch.Tensor]]:
    """(parameter name, state key, the optimizer's own tensor) for every state entry, in a fixed order.

    The optimizer holds the trainable parameters (or their local shards) in the model's order (trainers/loop.py).
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    own = [p for group in optimizer.param_groups for p in group["params"]]
    return [(name, key, local) for name, local in zip(names, own) for key in sorted(optimizer.state.get(local, {}))]


def _optimizer_key(name: str, key: str, param, value) -> str:
    if _reshardable(value, param):
        return f"{name}.{key}"
    return f"rank{distributed.rank()}.{name}.{key}"


def _reshardable(value, param) -> bool:
    """A state tensor that is element-wise with its parameter's (local) values, or a scalar such as `step`."""
    if not torch.is_tensor(value):
        return True
    local_shape = param.to_local().shape if isinstance(param, DTensor) else param.shape
    return value.dim() == 0 or value.shape == local_shape


def _as_saved(value, param):
    if torch.is_tensor(value) and value.dim() > 0 and isinstance(param, DTensor) and _reshardable(value, param):
        return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())  # fmt: skip
    return value


def _write_back(optimizer, model, loaded: dict) -> None:
    """Put what DCP loaded into the optimizer's state: tensors were filled in place, other values are new objects."""
    for (name, key, local), value in zip(_optimizer_entries(model, optimizer), loaded.values()):
        optimizer.state[local][key] = value.to_local() if isinstance(value, DTensor) else value


def _materialise_state(optimizer) -> None:
    """An optimizer's state exists only after its first step; DCP loads into existing tensors.

    One step with zero gradients and a learning rate of 0 creates every state tensor and moves no weight.
    """
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p in params:
        p.grad = None
