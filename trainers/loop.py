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
backward passes gives exactly the gradient of the full-batch loss. Its
metrics are shares too, and are summed the same way: the loop knows no
recipe's metric names, only `tokens` (trained tokens; tokens_per_s is tokens
per second of update time, the step minus the recipe's `preparation_seconds`, a run callback: trainers/infra/run.py).

On several processes (torchrun; data/base/distributed.py) the step's batch is the
global batch: each rank's `step_batches` are its slice of it, the shares are
shares of the global step, so the gradients and the metrics are summed over
ranks once per step, and rank 0 alone writes the log and the checkpoints.

Resumption is exact: the data position is a function of the step, and the
checkpoint holds the weights, the optimizer, the scheduler and the RNG states
as they were at the start of the next step. Ctrl-C or SIGTERM at any moment
writes a checkpoint of the last finished step before the run stops (see
`_Training`); a resumed run skips damaged checkpoints and repairs a log line
that a stop cut in half.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.trainers.config import TrainConfig
from twophase.trainers.infra import sharding
from twophase.trainers.infra.checkpoint import prune_checkpoints, rng_state, save_checkpoint
from twophase.trainers.infra.optim import build_optimizer, build_scheduler
from twophase.trainers.infra.reporting import Reporters
from twophase.trainers.infra.run import (
    DeferredInterrupts,
    MetricsLog,
    RunCallbacks,
    StepPrinter,
    autocast_context,
    out_of_memory_message,
    refuse_non_finite,
    refuse_pass_that_cannot_fit,
    restore,
)


class Recipe(Protocol):
    """What an algorithm is (trainers/dpo.py, trainers/grpo.py): its batches, its loss and its state."""

    model: torch.nn.Module
    device: torch.device

    def step_batches(self, step: int) -> list:
        """This rank's micro-batches of optimizer step `step` (objects that `loss` understands)."""

    def loss(self, micro_batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the step's loss, and its shares of the step's metrics (summed by the loop)."""

    def step_metrics(self, step: int) -> dict[str, float]:
        """Metrics of step `step` that are not sums over micro-batches (e.g. GRPO's rewards); the same on every rank."""

    def state_dict(self) -> dict:
        """What the recipe needs to resume exactly (e.g. the data position)."""

    def load_state_dict(self, state: dict) -> None: ...


def train(recipe: Recipe, config: TrainConfig, out_dir: Path, resume: bool = False, final_checkpoint: bool = True,
          callbacks: RunCallbacks | None = None) -> dict:  # fmt: skip
    """Run `config.max_steps` optimizer steps of `recipe`; returns the last step's metrics. `callbacks`: the run's
    concerns around the recipe (trainers/infra/run.py); `final_checkpoint=False`: none at the end (benchmarks)."""
    return _Training(recipe, config, Path(out_dir), callbacks or RunCallbacks()).run(resume, final_checkpoint)


@dataclass
class ResumePoint:
    """What a checkpoint holds besides the weights and the optimizer, as it was when they were at `step`."""

    step: int
    rng: dict
    recipe_state: dict


class _Training:
    """The loop's state: where a checkpoint written now would resume (`point`) and the newest one on disk (`saved`).

    Interrupts (Ctrl-C, SIGTERM) arrive as KeyboardInterrupt at any moment but
    two: from `optimizer.step()` until that step is recorded, and during a
    checkpoint write. There they wait for the end of the block (see
    `DeferredInterrupts`). So at any moment the live weights are those of
    `point`, and the checkpoint written on the way out is the last finished step.
    """

    def __init__(self, recipe: Recipe, config: TrainConfig, out_dir: Path, callbacks: RunCallbacks):
        self.recipe, self.config, self.callbacks = recipe, config, callbacks
        refuse_pass_that_cannot_fit(recipe.model, recipe.device, callbacks)  # trainers/infra/run.py
        self.checkpoint_dir = out_dir / "checkpoints"
        self.log = MetricsLog(out_dir / "metrics.jsonl")
        self.reporters = Reporters(config.report_to, out_dir, dataclasses.asdict(config))  # report_to: optional live logging
        self.parameters = [p for p in recipe.model.parameters() if p.requires_grad]
        sharding.start_replicas(recipe.model, self.parameters)
        # A sharded model's optimizer updates each rank's local shards (trainers/infra/sharding.py).
        self.shards = sharding.LocalShards(self.parameters) if sharding.is_sharded(recipe.model) else None
        self.optimizer = build_optimizer(self.shards.parameters if self.shards else self.parameters, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.autocast = autocast_context(recipe.device, config.precision)

    def run(self, resume: bool, final_checkpoint: bool) -> dict:
        config = self.config
        start_step = restore(self.recipe, self.optimizer, self.scheduler, self.checkpoint_dir, self.log, resume, config.seed)
        if distributed.is_main():
            self.callbacks.on_start(start_step)  # e.g. a recipe's own audit logs follow the metrics log
        self.point = ResumePoint(start_step, rng_state(), self.recipe.state_dict())
        self.saved = start_step  # step 0 needs no checkpoint; a resumed step has one
        self.printer = StepPrinter(config, start_step)
        last: dict = {}
        with DeferredInterrupts() as self.interrupts:
            try:
                for step in range(start_step, config.max_steps):
                    last = self._step(step)
                    self.printer.step_done(last)
                    if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.max_steps:
                        self._save()
                if final_checkpoint and self.saved != config.max_steps:
                    self._save()
            except KeyboardInterrupt:
                # A sharded checkpoint needs every rank at the same point, which a signal does not give:
                # a sharded run resumes from its last periodic checkpoint instead.
                if self.point.step != self.saved and not self.shards:
                    self._save()
                raise
            finally:
                self.printer.close()
                self.reporters.close()
        return last

    def _step(self, step: int) -> dict:
        started = time.perf_counter()
        try:
            collected = _accumulate_gradients(self.recipe, step, self.autocast)
        except torch.cuda.OutOfMemoryError as err:
            raise UserError(out_of_memory_message(self.callbacks.memory_advice(), err)) from None
        with self.interrupts.deferred():  # the update is applied once and recorded once, or not at all
            metrics = self._update(step, collected, started)
            self.log.write(metrics)
            self.reporters.write(metrics)
            self.point = ResumePoint(step + 1, rng_state(), self.recipe.state_dict())
        return metrics

    def _update(self, step: int, collected: list[dict], started: float) -> dict:
        recipe, config = self.recipe, self.config
        sharding.finish_gradients(recipe.model, self.parameters)  # once per step: the global batch's gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        refuse_non_finite(step, collected, sharding.total_norm(grad_norm), self.saved)  # trainers/infra/run.py
        if self.shards:
            self.shards.hand_over_gradients()
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.shards:
            recipe.model.zero_grad(set_to_none=True)
        if recipe.device.type == "cuda":
            torch.cuda.synchronize(recipe.device)
        elapsed = time.perf_counter() - started

        metrics = _sum_shares([m for rank in distributed.gather_objects(collected) for m in rank])
        metrics.update(recipe.step_metrics(step))
        metrics.update({"step": step + 1, "lr": lr, "grad_norm": sharding.total_norm(grad_norm), "step_time_s": elapsed})
        update_seconds = elapsed - self.callbacks.preparation_seconds(step)
        metrics["time/update_s"] = update_seconds
        if "tokens" in metrics:
            metrics["tokens_per_s"] = metrics["tokens"] / max(update_seconds, 1e-9)
        if recipe.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(recipe.device) / 2**30
        return metrics

    def _save(self) -> None:
        """Checkpoint `point`, then prune; a signal meanwhile waits, so the write is never cut short."""
        point = self.point
        with self.interrupts.deferred():
            # Replicated weights are the same on every rank: rank 0 writes them. Sharded ones: each rank its shards.
            if distributed.is_main() or self.shards:
                save_checkpoint(self.checkpoint_dir, point.step, self.recipe.model, self.optimizer, self.scheduler,
                                point.rng, point.recipe_state)  # fmt: skip
            if distributed.is_main():
                prune_checkpoints(self.checkpoint_dir, self.config.keep_checkpoints)
            self.saved = point.step


def _accumulate_gradients(recipe: Recipe, step: int, autocast) -> list[dict]:
    """Forward and backward passes of the step's micro-batches; the gradients add up in the parameters."""
    collected: list[dict] = []
    for micro_batch in recipe.step_batches(step):
        with autocast:
            loss, metrics = recipe.loss(micro_batch)
        loss.backward()
        collected.append({"loss": float(loss.detach()), **metrics})
    return collected


def _sum_shares(collected: list[dict]) -> dict:
    """The step's metrics: each micro-batch's (every rank's) shares added up."""
    keys = dict.fromkeys(k for m in collected for k in m)  # first-seen order, for readable logs
    return {key: sum(m[key] for m in collected if key in m) for key in keys}
