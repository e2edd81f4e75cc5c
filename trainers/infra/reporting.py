"""Optional live logging of training metrics to TensorBoard or Weights & Biases (`report_to`).

metrics.jsonl is always written (trainers/loop.py) and is what `twophase plot` reads;
`report_to: [tensorboard]` also writes TensorBoard event files to OUT_DIR/tensorboard,
`report_to: [wandb]` sends each step to a W&B run (project $WANDB_PROJECT, default
"twophase"; offline with WANDB_MODE=offline). Neither package is a dependency of
twophase: each is imported only when asked for, and a missing one is one line saying
how to install it, said before the model loads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from twophase.data.base import distributed
from twophase.data.base.errors import UserError

REPORTERS = ("tensorboard", "wandb")
# What each reporter imports, and the pip package that provides it.
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_reporters(report_to: list[str]) -> None:
    """Raise UserError for an unknown reporter or one whose package is not installed."""
    for name in report_to:
        if name not in REPORTERS:
            raise UserError(f"report_to: unknown reporter {name!r}; use any of: {', '.join(REPORTERS)}")
        module, package = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"report_to: {name} needs the {package} package, which is not installed: "
                            f"pip install {package} (or remove {name} from report_to)")  # fmt: skip


class Reporters:
    """The reporters a config asks for; `write(metrics)` sends one step to each."""

    def __init__(self, report_to: list[str], out_dir: Path, config: dict | None = None):
        check_reporters(report_to)
        self.writers = []
        if not distributed.is_main():  # one job, one run: rank 0 reports it (as it writes metrics.jsonl)
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(_TensorBoard(SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))))
        if "wandb" in report_to:
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "twophase"), name=Path(out_dir).resolve().name,
                             dir=str(out_dir), config=config or {}, resume="allow")  # fmt: skip
            self.writers.append(_WandB(run))

    def write(self, metrics: dict) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for writer in self.writers:
            writer.write(int(metrics["step"]), numbers)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def write(self, step: int, numbers: dict) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run):
        self.run = run

    def write(self, step: int, numbers: dict) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()
