"""Where a GPU's time goes during one call: kernel time by kind, and the time between kernels.

`profile_call(fn)` runs `fn` once under torch.profiler and sums the device time of
its kernels by kind (matrix products, attention, compiled element-wise kernels,
reductions and sampling, copies, the rest). The wall time minus the kernels' time
is time the GPU sat idle: kernel launches the host could not issue fast enough,
host synchronisations, and gaps between kernels. It is what `--profile` adds to
`twophase bench grpo|dpo` (one update's forward and backward passes) and
`twophase bench decode` (replayed decode steps).
"""

from __future__ import annotations

import time

import torch

KINDS = (
    ("attention", ("fmha", "flash", "attention", "attn")),
    ("matrix products", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitk", "cublas")),
    ("compiled element-wise", ("triton",)),
    ("reductions and sampling", ("reduce", "sort", "scan", "softmax", "argmax", "topk", "norm")),
    ("copies", ("copy", "index", "scatter", "gather", "cat", "memcpy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KINDS if any(mark in lowered for mark in marks)), "other element-wise")


def profile_call(fn, per: int = 1) -> dict:
    """Run fn() once under the profiler; milliseconds per `per` (e.g. per decode step), by kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        started = time.perf_counter()
        fn()
        synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3 / per
    by_kind: dict[str, float] = {}
    kernels: dict[str, list[float]] = {}
    for event in trace.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            kind = kernel_kind(event.name)
            by_kind[kind] = by_kind.get(kind, 0.0) + event.device_time / 1e3 / per
            kernels.setdefault(event.name[:100], []).append(event.device_time)
    busy_ms = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:12]
    return {
        "wall_ms": round(wall_ms, 3), "kernel_ms": round(busy_ms, 3), "idle_ms": round(wall_ms - busy_ms, 3),
        "kernels": round(sum(len(times) for times in kernels.values()) / per),
        "kernel_ms_by_kind": {kind: round(ms, 3) for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])},
        "top_kernels_ms": {name: round(sum(times) / 1e3 / per, 3) for name, times in top},
    }  # fmt: skip


def profile_update(recipe, config, step: int) -> dict:
    """The forward and backward passes of `step` once more (its batches, no optimizer step), profiled."""
    from twophase.trainers.infra.run import autocast_context
    from twophase.trainers.loop import _accumulate_gradients

    autocast = autocast_context(recipe.device, config.precision)
    return profile_call(lambda: _accumulate_gradients(recipe, step, autocast))
