"""The training loop that DPO and GRPO share.

A *recipe* (trainers/dpo.py, trainers/grpo.py) knows its algorithm; this loop
knows everything else. One optimizer step is:

    micro_batches = recipe.step_batches(step)          # DPO: the next pairs; GRPO: generate + score
    for mb in micro_batches:
        with autocast: loss, metrics = recipe.loss(mb)  # contributions that sum to the step's loss
        loss.backward()                                 # gradients accumulate across micro-batches
    clip gradients; optimizer.step(); scheduler.step(); zero gradients
    log metrics; every `save_every` steps write a checkpoint

`recipe.loss` returns each micro-batch's share of the step's loss (e.g. a
mean over its pairs times its share of the step's pairs), so summing the
backward passes gives exactly the gradient of the full-batch loss.

Metrics returned by `recipe.loss` are averaged over micro-batches, except
`tokens`, which is summed: tokens_per_s is trained (non-padding) tokens per
second of update time, i.e. of the step minus any `time/generation_s` and
`time/scoring_s` the recipe reports.

Resumption is exact: the data position is a function of the step, and the
checkpoint holds the weights, the optimizer, the scheduler and the RNG states
as they were at the start of the next step.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from data.errors import UserError
from trainers.checkpoint import (
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from trainers.config import TrainConfig
from trainers.optim import build_optimizer, build_scheduler


class Recipe(Protocol):
    model: torch.nn.Module
    device: torch.device

    def step_batches(self, step: int) -> list: ...

    def loss(self, micro_batch) -> tuple[torch.Tensor, dict[str, float]]: ...

    def step_metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def train(recipe: Recipe, config: TrainConfig, out_dir: Path, resume: bool = False, final_checkpoint: bool = True) -> dict:
    """Run `config.max_steps` optimizer steps of `recipe`; returns the last step's metrics.

    `final_checkpoint=False` skips the checkpoint at the end (benchmarks, which keep nothing).
    """
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    log = MetricsLog(out_dir / "metrics.jsonl")
    parameters = [p for p in recipe.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, config)
    scheduler = build_scheduler(optimizer, config)

    start_step = _restore(recipe, optimizer, scheduler, checkpoint_dir, log, resume, config.seed)
    if hasattr(recipe, "truncate_logs_after"):  # a recipe's own audit logs follow the metrics log
        recipe.truncate_logs_after(start_step)
    autocast = autocast_context(recipe.device, config.precision)
    progress = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
    last: dict = {}
    window: list[dict] = []  # the steps since the last printed line, averaged when printed
    with sigterm_as_interrupt():
        for step in range(start_step, config.max_steps):
            step_rng = rng_state()  # saved if this step is interrupted, so a resume replays it exactly
            try:
                last = _one_step(recipe, step, parameters, optimizer, scheduler, autocast, config)
            except KeyboardInterrupt:
                progress.close()
                if step > start_step:  # at start_step a checkpoint already exists (or nothing was done)
                    save_checkpoint(checkpoint_dir, step, recipe.model, optimizer, scheduler, step_rng, recipe.state_dict())
                raise
            log.write(last)
            window.append(last)
            progress.update(1)
            progress.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "grad_norm") if k in last})
            if config.log_every and (step + 1) % config.log_every == 0:
                tqdm.write(_format_metrics(_reduce(window) | {"step": step + 1}))
                window = []
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.max_steps:
                save_checkpoint(checkpoint_dir, step + 1, recipe.model, optimizer, scheduler, rng_state(), recipe.state_dict())
                prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
    progress.close()
    if final_checkpoint and start_step < config.max_steps:
        save_checkpoint(checkpoint_dir, config.max_steps, recipe.model, optimizer, scheduler, rng_state(), recipe.state_dict())
        prune_checkpoints(checkpoint_dir, config.keep_checkpoints)
    return last


def _one_step(recipe, step, parameters, optimizer, scheduler, autocast, config) -> dict:
    started = time.perf_counter()
    micro_batches = recipe.step_batches(step)
    collected: list[dict] = []
    for micro_batch in micro_batches:
        with autocast:
            loss, metrics = recipe.loss(micro_batch)
        loss.backward()
        collected.append({"loss": float(loss.detach()), **metrics})
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
    optimizer.step()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if recipe.device.type == "cuda":
        torch.cuda.synchronize(recipe.device)
    elapsed = time.perf_counter() - started

    metrics = _reduce(collected)
    metrics["loss"] = sum(m["loss"] for m in collected)  # contributions sum to the step's loss
    metrics.update(recipe.step_metrics())
    metrics.update({"step": step + 1, "lr": lr, "grad_norm": float(grad_norm), "step_time_s": elapsed})
    # GRPO reports its generation and scoring time; the rest of the step is the update
    update_seconds = elapsed - metrics.get("time/generation_s", 0.0) - metrics.get("time/scoring_s", 0.0)
    metrics["time/update_s"] = update_seconds
    if "tokens" in metrics:
        metrics["tokens_per_s"] = metrics["tokens"] / max(update_seconds, 1e-9)
    if recipe.device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(recipe.device) / 2**30
    return metrics


def _reduce(collected: list[dict]) -> dict:
    keys = dict.fromkeys(k for m in collected for k in m)  # first-seen order, for readable logs
    out = {}
    for key in keys:
        values = [m[key] for m in collected if key in m]
        out[key] = sum(values) if key == "tokens" else sum(values) / len(values)
    return out


def _restore(recipe, optimizer, scheduler, checkpoint_dir, log, resume, seed) -> int:
    checkpoints = list_checkpoints(checkpoint_dir)
    if not resume:
        if checkpoints:
            raise UserError(
                f"{checkpoint_dir.parent} already holds checkpoints of an earlier run; pass --resume to continue it, "
                f"or choose another out_dir (--set out_dir=...)"
            )
        seed_everything(seed)
        log.reset()
        return 0
    if not checkpoints:
        tqdm.write(f"no checkpoint in {checkpoint_dir}: starting from step 0")
        seed_everything(seed)
        log.reset()
        return 0
    state = load_checkpoint(checkpoints[-1], recipe.model, optimizer, scheduler)
    recipe.load_state_dict(state["recipe"])
    set_rng_state(state["rng"])
    log.truncate_after(state["step"])
    tqdm.write(f"resumed from {checkpoints[-1]} (step {state['step']})")
    return state["step"]


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on GPU; on the CPU the tiny demo model runs in float32."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class MetricsLog:
    """metrics.jsonl: one JSON object per step, appended and flushed as training goes."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def reset(self) -> None:
        atomic_write_text(self.path, "")

    def write(self, metrics: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the checkpoint does not contain (they will be redone)."""
        if not self.path.exists():
            return self.reset()
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _format_metrics(metrics: dict) -> str:
    """One line per logging interval: metrics averaged over the steps since the last line."""
    parts = [f"step {metrics['step']}"]
    for key, value in metrics.items():
        if key != "step":
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


class sigterm_as_interrupt:
    """Turn SIGTERM (a cluster's preemption) into KeyboardInterrupt so a checkpoint is written."""

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not in the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt
