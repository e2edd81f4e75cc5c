"""`twophase plot`: training curves from metrics.jsonl, several runs overlaid, as one PNG.

The panels, against the optimizer step (a panel no run logged says so):

  loss                       the step's loss
  rewards                    DPO's implicit rewards (chosen, rejected, margin); the spread of GRPO's rewards
  reward accuracy            DPO's share of pairs ranked right; GRPO's mean reward
  KL                         GRPO's KL to the reference (logged when beta > 0)
  grad norm                  before clipping
  throughput                 trained tokens per second (and GRPO's generated tokens per second)

matplotlib is an optional extra (`pip install 'twophase[plot]'`), imported only here
and only when a plot is drawn; reading the curves needs nothing but the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from twophase.data.base.errors import UserError

# (panel title, [(metrics.jsonl key, what the legend calls it)])
PANELS = [
    ("loss", [("loss", "loss")]),
    ("rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"), ("rewards/margin", "margin"),
                 ("reward/std", "reward std")]),
    ("reward accuracy / mean reward", [("rewards/accuracy", "accuracy"), ("reward/mean", "mean reward")]),
    ("KL", [("kl", "KL")]),
    ("grad norm", [("grad_norm", "grad norm")]),
    ("throughput (tokens/s)", [("tokens_per_s", "trained"), ("generation_tokens_per_s", "generated")]),
]  # fmt: skip
INSTALL_HINT = "pip install 'twophase[plot]' (or pip install matplotlib)"


def training_runs(paths) -> list[Path]:
    """The training runs under the given paths: a directory holding metrics.jsonl, or a pipeline run directory
    whose stages hold one (dpo, grpo_<condition>)."""
    runs = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p.parent for p in path.glob("*/metrics.jsonl"))
        else:
            raise UserError(f"{path} is not a directory; pass a training run's out_dir or a pipeline RUN_DIR")
    if not runs:
        raise UserError(f"no metrics.jsonl in {', '.join(map(str, paths))}: pass a training run's out_dir or a pipeline RUN_DIR")
    return runs


def read_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} of a run's metrics.jsonl; a torn last line (a stopped run) is left out."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for line in Path(run_dir, "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return curves


def pyplot():
    """matplotlib's pyplot on the file-only backend, or one UserError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(f"plots need matplotlib, an optional extra that is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def plotting_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_runs(run_dirs: list[Path], target: Path, labels: list[str] | None = None) -> Path:
    """One PNG with a panel per entry of PANELS, every run overlaid; returns its path."""
    plt = pyplot()
    labels = labels or [Path(d).name for d in run_dirs]
    curves = [read_curves(d) for d in run_dirs]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for axis, (title, keys) in zip(axes.flat, PANELS):
        drawn = 0
        for label, run in zip(labels, curves):
            for key, name in keys:
                if key in run:
                    axis.plot(*run[key], label=f"{label}: {name}" if len(keys) > 1 else label)
                    drawn += 1
        axis.set_title(title)
        axis.set_xlabel("step")
        if drawn:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=axis.transAxes)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    temporary.replace(target)  # atomic: a reader never sees half a PNG
    return target


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: curves.png in the first RUN_DIR).")
@click.option("--names", default=None, help="Comma-separated legend names, one per training run.")
def plot_command(run_dirs, out_file, names):
    """Plot loss, rewards, KL, reward accuracy, grad norm and throughput against step; several runs overlaid.

    RUN_DIR is a training run's out_dir, or a pipeline RUN_DIR (its dpo and grpo_* stages).

    Example: twophase plot runs/demo/grpo_random runs/demo/grpo_zero runs/demo/grpo_toy
    """
    runs = training_runs(run_dirs)
    labels = [n.strip() for n in names.split(",")] if names else None
    if labels is not None and len(labels) != len(runs):
        raise UserError(f"--names needs {len(runs)} names, one per training run ({', '.join(str(r) for r in runs)})")
    target = plot_runs(runs, Path(out_file) if out_file else Path(run_dirs[0]) / "curves.png", labels)
    click.echo(f"wrote {target} ({len(runs)} run(s): {', '.join(str(r) for r in runs)})")
