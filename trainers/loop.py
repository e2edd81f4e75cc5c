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
per second of update time, the step minus the recipe's `preparation_seconds`).

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
import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.files import atomic_write_text, remove_stale_temporaries
from twophase.data.base.run_dir import owned
from twophase.trainers.infra.checkpoint import (
    list_checkpoints,
    moment,
    prune_checkpoints,
    restore_newest,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from twophase.trainers.config import TrainConfig
from twophase.trainers.infra.optim import build_optimizer, build_scheduler
from twophase.trainers.infra import sharding
from twophase.trainers.infra.reporting import Reporters


class Recipe(Protocol):
    """Every hook the loop calls; an algorithm (trainers/dpo.py, trainers/grpo.py) implements them all."""

    model: torch.nn.Module
    device: torch.device

    def step_batches(self, step: int) -> list:
        """This rank's micro-batches of optimizer step `step` (objects that `loss` understands)."""

    def loss(self, micro_batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the step's loss, and its shares of the step's metrics (summed by the loop)."""

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the whole step that are not sums over micro-batches (e.g. GRPO's rewards); the same on every rank."""

    def preparation_seconds(self) -> float:
        """Seconds of this step spent before the update (GRPO: generation and scoring); 0 when none."""

    def memory_advice(self) -> str:
        """Which settings to lower when a step does not fit in GPU memory."""

    def truncate_logs_after(self, step: int) -> None:
        """Drop the recipe's own audit records of steps after `step` (they will be redone)."""

    def state_dict(self) -> dict:
        """What the recipe needs to resume exactly (e.g. the data position)."""

    def load_state_dict(self, state: dict) -> None: ...


def train(recipe: Recipe, config: TrainConfig, out_dir: Path, resume: bool = False, final_checkpoint: bool = True) -> dict:
    """Run `config.max_steps` optimizer steps of `recipe`; returns the last step's metrics.

    `final_checkpoint=False` skips the checkpoint at the end (benchmarks, which keep nothing).
    """
    return _Training(recipe, config, Path(out_dir)).run(resume, final_checkpoint)


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

    def __init__(self, recipe: Recipe, config: TrainConfig, out_dir: Path):
        self.recipe, self.config = recipe, config
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
        start_step = _restore(self.recipe, self.optimizer, self.scheduler, self.checkpoint_dir, self.log, resume, config.seed)
        if distributed.is_main():
            self.recipe.truncate_logs_after(start_step)  # a recipe's own audit logs follow the metrics log
        self.point = ResumePoint(start_step, rng_state(), self.recipe.state_dict())
        self.saved = start_step  # step 0 needs no checkpoint; a resumed step has one
        self.progress = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             disable=not distributed.is_main())  # fmt: skip
        last: dict = {}
        window: list[dict] = []  # the steps since the last printed line, averaged when printed
        with DeferredInterrupts() as self.interrupts:
            try:
                for step in range(start_step, config.max_steps):
                    last = self._step(step)
                    window.append(last)
                    self.progress.update(1)
                    self.progress.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "grad_norm") if k in last})
                    if config.log_every and (step + 1) % config.log_every == 0 and distributed.is_main():
                        tqdm.write(_format_metrics(_reduce(window) | {"step": step + 1}))
                        window = []
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
                self.progress.close()
                self.reporters.close()
        return last

    def _step(self, step: int) -> dict:
        started = time.perf_counter()
        try:
            collected = _accumulate_gradients(self.recipe, step, self.autocast)
        except torch.cuda.OutOfMemoryError as err:
            raise UserError(_out_of_memory(self.recipe, err)) from None
        moment("step:before_update", step + 1)
        with self.interrupts.deferred():  # the update is applied once and recorded once, or not at all
            metrics = self._update(step, collected, started)
            moment("step:before_record", step + 1)
            self.log.write(metrics)
            self.reporters.write(metrics)
            self.point = ResumePoint(step + 1, rng_state(), self.recipe.state_dict())
        moment("step:after_record", step + 1)
        return metrics

    def _update(self, step: int, collected: list[dict], started: float) -> dict:
        recipe, config = self.recipe, self.config
        sharding.finish_gradients(recipe.model, self.parameters)  # once per step: the global batch's gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        if self.shards:
            self.shards.hand_over_gradients()
        self.optimizer.step()
        moment("step:after_optimizer", step + 1)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.shards:
            recipe.model.zero_grad(set_to_none=True)
        if recipe.device.type == "cuda":
            torch.cuda.synchronize(recipe.device)
        elapsed = time.perf_counter() - started

        metrics = _sum_shares([m for rank in distributed.gather_objects(collected) for m in rank])
        metrics.update(recipe.step_metrics())
        metrics.update({"step": step + 1, "lr": lr, "grad_norm": sharding.total_norm(grad_norm), "step_time_s": elapsed})
        update_seconds = elapsed - recipe.preparation_seconds()
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
    micro_batches = recipe.step_batches(step)
    for micro_batch in micro_batches:
        with autocast:
            loss, metrics = recipe.loss(micro_batch)
        loss.backward()
        collected.append({"loss": float(loss.detach()), **metrics})
    return collected


def _out_of_memory(recipe: Recipe, err: Exception) -> str:
    advice = recipe.memory_advice()
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else "CUDA out of memory"
    return f"out of GPU memory in a training step ({first}); {advice}, then rerun with --resume"


def _sum_shares(collected: list[dict]) -> dict:
    """The step's metrics: each micro-batch's (every rank's) shares added up."""
    keys = dict.fromkeys(k for m in collected for k in m)  # first-seen order, for readable logs
    return {key: sum(m[key] for m in collected if key in m) for key in keys}


def _reduce(collected: list[dict]) -> dict:
    keys = dict.fromkeys(k for m in collected for k in m)  # first-seen order, for readable logs
    out = {}
    for key in keys:
        values = [m[key] for m in collected if key in m]
        out[key] = sum(values) if key == "tokens" else sum(values) / len(values)
    return out


@contextmanager
def owned_out_dir(out_dir, resume: bool):
    """Hold `out_dir` for a training run (data/base/run_dir.py); yields it as a Path.

    Before anything is written there: leftovers of killed runs are removed, and a
    directory that holds an earlier run's checkpoints is refused without --resume.
    """
    if not distributed.is_main():  # rank 0 holds the directory for the whole job; the others wait until it has
        distributed.barrier()
        refuse_earlier_run(Path(out_dir) / "checkpoints", resume)
        yield Path(out_dir)
        return
    with owned(out_dir) as path:
        checkpoint_dir = path / "checkpoints"
        if checkpoint_dir.is_dir():
            remove_stale_temporaries(checkpoint_dir)
        refuse_earlier_run(checkpoint_dir, resume)
        distributed.barrier()
        yield path


def refuse_earlier_run(checkpoint_dir: Path, resume: bool) -> None:
    """Without --resume, a directory that holds an earlier run's checkpoints is not reused."""
    if not resume and list_checkpoints(checkpoint_dir):
        raise UserError(
            f"{Path(checkpoint_dir).parent} already holds checkpoints of an earlier run; pass --resume to continue it, "
            f"or choose another out_dir (--set out_dir=...)"
        )


def _restore(recipe, optimizer, scheduler, checkpoint_dir, log, resume, seed) -> int:
    refuse_earlier_run(checkpoint_dir, resume)
    restored = restore_newest(checkpoint_dir, recipe.model, optimizer, scheduler, report=tqdm.write) if resume else None
    if restored is None:
        if resume:
            intact = "intact checkpoint" if list_checkpoints(checkpoint_dir) else "checkpoint"
            tqdm.write(f"no {intact} in {checkpoint_dir}: starting from step 0")
        seed_everything(seed)
        log.reset()
        return 0
    path, state = restored
    recipe.load_state_dict(state["recipe"])
    set_rng_state(state["rng"])
    log.truncate_after(state["step"])
    tqdm.write(f"resumed from {path} (step {state['step']})")
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
        if distributed.is_main():
            atomic_write_text(self.path, "")

    def write(self, metrics: dict) -> None:
        if not distributed.is_main():
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the checkpoint does not contain (they will be redone)."""
        if not distributed.is_main():
            return
        if not self.path.exists():
            return self.reset()
        keep_records_up_to(self.path, step)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite a JSONL log of per-step records with those of steps <= `step` only (the later ones will be redone).

    A last line that is not a complete record is what a stop in the middle of a write leaves: it is
    dropped with one line saying so. Any other line that is not JSON means the file was damaged.
    """
    lines = [line for line in Path(path).read_bytes().split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(f"record {number} of {path} is not JSON: the file is damaged; repair or delete it") from None
            tqdm.write(f"{path}: dropped a torn last line ({len(line)} bytes of a record cut off by a stop)")
    kept = [record for record in records if record["step"] <= step]
    atomic_write_text(Path(path), "".join(json.dumps(record) + "\n" for record in kept))


def _format_metrics(metrics: dict) -> str:
    """One line per logging interval: metrics averaged over the steps since the last line."""
    parts = [f"step {metrics['step']}"]
    parts += [f"{key} {readable_number(value)}" for key, value in metrics.items() if key != "step"]
    return " | ".join(parts)


def readable_number(value) -> str:
    """A metric for a person: 4 significant digits, small numbers in exponent form (1e-06, -3.2e-05), never -0."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value == 0:
        return "0"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if abs(value) >= 1e4:
        return f"{value:.0f}"
    return f"{value:.4g}"


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


class DeferredInterrupts:
    """SIGINT and SIGTERM as KeyboardInterrupt, held back inside `deferred()` blocks.

    Outside a block a signal raises KeyboardInterrupt at once, as Python's own
    Ctrl-C does, so a long generation or forward pass stops without waiting.
    Inside one it is remembered and raised as the block ends: the block (an
    optimizer update and its record, a checkpoint write) is never cut half-way.
    A second signal inside a block changes nothing; SIGKILL cannot be caught
    and is what checkpoints' atomic renames are for.
    """

    def __init__(self):
        self.depth = 0
        self.pending = False
        self.previous: dict = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not in the main thread: signals are not ours to handle
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def _on_signal(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending:  # reached only when the block ended without an exception
            self.pending = False
            raise KeyboardInterrupt
