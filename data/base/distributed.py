"""Running on several processes (GPUs) with torch.distributed: the one place that knows about ranks.

`torchrun --nproc-per-node N -m twophase.launch.cli dpo|grpo|eval|pipeline …` starts N
copies of the command and tells each its place through environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without them (a plain
`twophase …`) everything here is a no-op: one process, rank 0 of 1.

What is distributed, and where:
- the process group: `start()` joins it (NCCL on CUDA, gloo on the CPU) with a
  collective timeout, so a rank that dies ends the job instead of hanging it;
- the batch: the config's batch is the global batch; each rank takes an equal,
  contiguous slice of it (`my_slice`), and a world size that does not divide
  it is refused before any model loads (`check_divides`);
- gradients: summed over ranks exactly once per optimizer step
  (`sum_gradients` for replicated weights; FSDP2 reduce-scatters its own,
  trainers/infra/sharding.py);
- outputs: logs, metrics, samples, checkpoint manifests and final models are
  written by rank 0 only (`is_main`).

Everything that must agree across ranks (data order, rollout seeds) is a pure
function of (seed, step) and needs no communication.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from twophase.data.base.errors import UserError

# A collective that waits longer than this ends the job: a rank that died (or hangs) must not freeze the others.
TIMEOUT_ENV = "TWOPHASE_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800  # longer than the slowest legitimate wait: one rank's Lean checks or a checkpoint write


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun); readable before the group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def start(device: torch.device | None = None) -> None:
    """Join the process group torchrun set up; nothing for a single process. Safe to call twice."""
    if launched_world_size() == 1 or dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_alone = False  # a one-process group that runs the multi-process code path (start_alone)


def start_alone(device: torch.device) -> None:
    """A process group of this process alone, in which every multi-process code path runs (FSDP2 sharding,
    collectives, sharded checkpoints) as it would on N GPUs: `twophase bench --process-group` uses it to
    check and measure those paths on a single GPU. Not for training: one process needs none of it."""
    global _alone
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    _alone = True


def active() -> bool:
    return dist.is_initialized() and (dist.get_world_size() > 1 or _alone)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else launched_rank()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else launched_world_size()


def is_main() -> bool:
    """Whether this process writes the run's files and prints its progress (rank 0)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Each rank's own GPU (cuda:LOCAL_RANK) under torchrun; `device` unchanged otherwise."""
    if device.type == "cuda" and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def check_divides(total: int, what: str, advice: str) -> None:
    """A global batch that the world size does not split evenly: one line, before any model loads."""
    n = launched_world_size()
    if total % n:
        raise UserError(f"{what} = {total} cannot be split evenly over {n} processes; {advice}")


def my_slice(total: int) -> slice:
    """This rank's contiguous share of `total` items (`total` divisible by the world size)."""
    share = total // world_size()
    return slice(rank() * share, (rank() + 1) * share)


def on_my_rows(rows: int, work):
    """Run `work(my_rows)` on this rank's rows of a batch of `rows` global rows; the one place a step splits by rank.

    `my_rows` is a range of global row indices (all of them for one process). `work` returns
    (kept, reported): `kept` stays on this rank; `reported` (plain values) comes back from every
    rank, in rank order, so that what spans the batch (advantages, summaries) sees every row.
    """
    share = my_slice(rows)
    kept, reported = work(range(share.start, share.stop))
    return kept, gather_objects(reported)


def shard_of(items: list) -> list:
    """Items i ≡ rank (mod world): a near-equal share of any number of items (evaluation)."""
    return items[rank() :: world_size()]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] alone for one process)."""
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(value: float) -> float:
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast_parameters(parameters: list[torch.nn.Parameter]) -> None:
    """Rank 0's values in every rank's replica (as DDP does when it starts): replicas that begin equal stay equal."""
    if not active():
        return
    with torch.no_grad():
        for p in parameters:
            dist.broadcast(p.data, src=0)


def sum_gradients(parameters: list[torch.nn.Parameter], bucket_bytes: int = 1 << 26) -> None:
    """Sum each gradient over ranks, in place: what DDP does, once per optimizer step.

    Every rank's micro-batch losses are already shares of the *global* batch's loss,
    so the sum (not the mean) of the ranks' gradients is the global gradient.
    Gradients are flattened into buckets of about `bucket_bytes` so a LoRA adapter's
    hundreds of small tensors cost a few collectives, not hundreds.
    """
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= bucket_bytes:
            _all_reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _all_reduce_bucket(bucket)
    for p, grad in zip(parameters, grads):
        p.grad = grad


def _all_reduce_bucket(tensors: list[torch.Tensor]) -> None:
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
