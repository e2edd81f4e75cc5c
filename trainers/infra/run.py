"""The run around the training loop: its directory, its metrics log, its signals and its printed lines.

None of this is the algorithm (trainers/loop.py is): it is what makes a run resumable and readable.

* `owned_out_dir`: one writer per output directory, and no silent reuse of an earlier run's;
* `restore`: the newest intact checkpoint, or a fresh seeded start;
* `MetricsLog`: metrics.jsonl, one record per step, cut back to the checkpoint on resume;
* `DeferredInterrupts`: Ctrl-C and SIGTERM wait for the end of an update or a checkpoint write;
* `StepPrinter`: the progress bar (plain lines in a log file) and one averaged line every `log_every` steps;
* `RunCallbacks`: what a run asks of its recipe's surroundings (memory advice, its own logs, preparation time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.files import atomic_write_text, remove_stale_temporaries
from twophase.data.base.progress import progress, say
from twophase.data.base.run_dir import owned
from twophase.trainers.infra.checkpoint import list_checkpoints, restore_newest, seed_everything, set_rng_state


@dataclass
class RunCallbacks:
    """Run-level concerns of a recipe, none of them part of its algorithm; each has a harmless default.

    `memory_advice()`: which settings to lower when a step does not fit in GPU memory.
    `on_start(step)`: called once (rank 0) before the first step; e.g. GRPO cuts samples.jsonl back to `step`.
    `preparation_seconds(step)`: seconds of step `step` spent before the update (GRPO: generation and
    scoring), which the loop subtracts to time the update; the same answer however often it is asked.
    """

    memory_advice: Callable[[], str] = lambda: "lower micro_batch_size"
    on_start: Callable[[int], None] = lambda step: None
    preparation_seconds: Callable[[int], float] = lambda step: 0.0
    pass_tokens: int = 0  # the most tokens one forward pass holds (0: unknown), checked against the device's memory


def refuse_pass_that_cannot_fit(model, device: torch.device, callbacks: RunCallbacks) -> None:
    """One line before the first step when a forward pass cannot fit in the device's memory, by an estimate.

    bytes ≈ weights + tokens × bytes per value × (layers × hidden          the checkpointed layer inputs
                                                  + 2 × (3 × intermediate + 6 × hidden))  one layer recomputed,
                                                                                           forward and backward
    It errs low (no optimizer state, no allocator slack), so it refuses only what surely fails.
    """
    if not callbacks.pass_tokens:
        return
    config = getattr(model, "config", None)
    layers, hidden = getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    value_bytes = 2 if device.type == "cuda" else 4  # bf16 autocast on a GPU; float32 on the CPU
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = weights + callbacks.pass_tokens * value_bytes * (layers * hidden + 2 * (3 * intermediate + 6 * hidden))
    have = device_memory_bytes(device)
    if have and need > have:
        raise UserError(f"a forward pass of {callbacks.pass_tokens:,} tokens needs about {need / 2**30:.1f} GiB "
                        f"(weights + layer checkpoints + one layer recomputed; trainers/infra/run.py) but "
                        f"{device} has {have / 2**30:.1f} GiB; {callbacks.memory_advice()}")  # fmt: skip


def device_memory_bytes(device: torch.device) -> int | None:
    """The device's memory: the GPU's, or on the CPU what this process may still take (RAM, its address-space limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os
    import resource

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return ram
    with open("/proc/self/statm") as statm:  # the address space already used counts against the limit
        used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    return min(ram, max(0, limit - used))


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on GPU; on the CPU the tiny demo model runs in float32."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def refuse_non_finite(step: int, collected: list[dict], grad_norm: float, newest_checkpoint: int) -> None:
    """Stop before the optimizer step if the loss or the gradient is not finite: no NaN ever reaches the weights."""
    losses = [m["loss"] for m in collected]
    if all(math.isfinite(x) for x in losses) and math.isfinite(grad_norm):
        return
    what = f"the loss is {sum(losses)}" if not all(math.isfinite(x) for x in losses) else f"the gradient norm is {grad_norm}"
    where = f"the newest checkpoint, step {newest_checkpoint}, is intact" if newest_checkpoint else "no checkpoint was written"
    raise UserError(f"step {step + 1}: {what}; the update was not applied and {where}. Non-finite numbers come from the "
                    f"data, a reward or too high a learning rate: fix that, then rerun (with --resume to continue)")


def out_of_memory_message(advice: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else "CUDA out of memory"
    return f"out of GPU memory in a training step ({first}); {advice}, then rerun with --resume"


@contextmanager
def owned_out_dir(config, resume: bool):
    """Hold `config.out_dir` for a training run (data/base/run_dir.py); yields it as a Path.

    Before anything is written there: leftovers of killed runs are removed, a
    directory that holds an earlier run's checkpoints is refused without --resume,
    and with --resume one whose run was another command, or had other values of
    the keys that shape its checkpoints, is refused with what differs.
    """
    out_dir = config.out_dir
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
        if resume:
            refuse_another_run(path / "config.json", config)
        distributed.barrier()
        yield path


# What a checkpoint's weights and optimizer state were made for: resuming with other values cannot be exact.
SHAPING_KEYS = ("model", "lora", "lora_r", "lora_alpha", "lora_target_modules", "layout", "optimizer")


def refuse_another_run(saved: Path, config) -> None:
    """--resume only continues the run that wrote `saved` (its config.json): the same command and shaping keys."""
    if not saved.is_file():
        return
    try:
        earlier = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{saved} is not readable JSON, so this run cannot be checked against it; "
                        f"move the folder away or choose another out_dir") from None  # fmt: skip
    now = dataclasses.asdict(config)
    if not isinstance(earlier, dict) or set(earlier) != set(now):
        command = type(config).__name__.removesuffix("Config").lower()
        raise UserError(f"{saved.parent} holds a run of another command (its config.json is not a {command} config); "
                        f"--resume continues only the run that wrote it: choose another out_dir")  # fmt: skip
    differs = [f"{key} {earlier[key]!r} -> {now[key]!r}" for key in SHAPING_KEYS if key in now and earlier[key] != now[key]]
    if differs:
        raise UserError(f"{saved.parent} was trained with other settings that its checkpoints depend on "
                        f"({'; '.join(differs)}); resume with the run's own values, or choose another out_dir")  # fmt: skip


def refuse_earlier_run(checkpoint_dir: Path, resume: bool) -> None:
    """Without --resume, a directory that holds an earlier run's checkpoints is not reused."""
    if not resume and list_checkpoints(checkpoint_dir):
        raise UserError(
            f"{Path(checkpoint_dir).parent} already holds checkpoints of an earlier run; pass --resume to continue it, "
            f"or choose another out_dir (--set out_dir=...)"
        )


def restore(recipe, optimizer, scheduler, checkpoint_dir, log, resume, seed) -> int:
    refuse_earlier_run(checkpoint_dir, resume)
    restored = restore_newest(checkpoint_dir, recipe.model, optimizer, scheduler, report=say) if resume else None
    if restored is None:
        if resume:
            intact = "intact checkpoint" if list_checkpoints(checkpoint_dir) else "checkpoint"
            say(f"no {intact} in {checkpoint_dir}: starting from step 0")
        seed_everything(seed)
        log.reset()
        return 0
    path, state = restored
    recipe.load_state_dict(state["recipe"])
    set_rng_state(state["rng"])
    log.truncate_after(state["step"])
    say(f"resumed from {path} (step {state['step']})")
    return state["step"]


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

    A record is a JSON object with a whole-number "step". A last line that is not one is what a stop
    in the middle of a write leaves (or a damaged end): it is dropped with one line saying so. Any
    other line that is not a record means the file was damaged.
    """
    lines = [line for line in Path(path).read_bytes().split(b"\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        record = _step_record(line)
        if record is not None:
            records.append(record)
        elif number < len(lines):
            raise UserError(f"record {number} of {path} is not a step record (a JSON object with a \"step\"): the file "
                            f"is damaged; repair or delete it")  # fmt: skip
        else:
            say(f"{path}: dropped a torn last line ({len(line)} bytes that are not a whole step record)")
    kept = [record for record in records if record["step"] <= step]
    atomic_write_text(Path(path), "".join(json.dumps(record) + "\n" for record in kept))


def _step_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record.get("step"), bool)
    return record if ok else None


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


HEADLINE_METRICS = ("loss", "rewards/accuracy", "reward/mean", "grad_norm")  # beside the bar: DPO's, GRPO's


class StepPrinter:
    """The progress bar (off a terminal, a plain line now and then: data/base/progress.py), and every `log_every`
    steps one line of the metrics averaged since the last line (rank 0)."""

    def __init__(self, config, start_step: int):
        self.log_every = config.log_every
        self.window: list[dict] = []
        self.bar = progress(total=config.max_steps, initial=start_step, desc="train", unit="step",
                            disable=not distributed.is_main())  # fmt: skip

    def step_done(self, metrics: dict) -> None:
        self.window.append(metrics)
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in HEADLINE_METRICS if k in metrics})  # before the
        self.bar.update(1)  # update, which may print a line off a terminal
        step = metrics["step"]
        if self.log_every and step % self.log_every == 0 and distributed.is_main():
            say(_format_metrics(_reduce(self.window) | {"step": step}))
            self.window = []

    def close(self) -> None:
        self.bar.close()


def _reduce(collected: list[dict]) -> dict:
    keys = dict.fromkeys(k for m in collected for k in m)  # first-seen order, for readable logs
    out = {}
    for key in keys:
        values = [m[key] for m in collected if key in m]
        out[key] = sum(values) if key == "tokens" else sum(values) / len(values)
    return out


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
