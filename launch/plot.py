"""`twophase plot`: training curves from metrics.jsonl, several runs overlaid, as one PNG.

One row of panels per phase among the runs, against the optimizer step; DPO's and GRPO's
quantities never share an axis (a run's phase is told by what it logged: PHASE_MARKERS).
Each run keeps one colour in every panel; in a panel of several quantities the line style
tells them apart. A panel no run logged says so.

  DPO    loss | implicit rewards (chosen, rejected, margin) | reward accuracy | grad norm | trained tokens/s
  GRPO   loss | reward (mean, std over the step's completions) | KL to the reference (beta > 0) | grad norm
         | tokens/s (trained, generated)

matplotlib is an optional extra (`pip install 'twophase[plot]'`, which the Quickstart installs),
imported only here and only when a plot is drawn; reading the curves needs nothing but the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from twophase.data.base.errors import UserError

# phase -> its panels: (title, [(metrics.jsonl key, what the legend calls it)])
PHASE_PANELS = {
    "DPO": [
        ("DPO loss", [("loss", "loss")]),
        ("DPO implicit rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                                  ("rewards/margin", "margin")]),
        ("DPO reward accuracy (share of pairs ranked right)", [("rewards/accuracy", "accuracy")]),
        ("DPO grad norm (before clipping)", [("grad_norm", "grad norm")]),
        ("DPO throughput (trained tokens/s)", [("tokens_per_s", "trained")]),
    ],
    "GRPO": [
        ("GRPO loss", [("loss", "loss")]),
        ("GRPO reward (over the step's completions)", [("reward/mean", "mean"), ("reward/std", "std")]),
        ("GRPO KL to the reference", [("kl", "KL")]),
        ("GRPO grad norm (before clipping)", [("grad_norm", "grad norm")]),
        ("GRPO throughput (tokens/s)", [("tokens_per_s", "trained"), ("generation_tokens_per_s", "generated")]),
    ],
}  # fmt: skip
PHASE_MARKERS = {"DPO": "rewards/accuracy", "GRPO": "reward/mean"}  # logged every step by that phase alone
LINE_STYLES = ("-", "--", ":")
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


def phase_of(run_dir: Path, curves: dict) -> str:
    """DPO or GRPO, by the metric only that phase logs; one line when a run logged neither."""
    phases = [phase for phase, key in PHASE_MARKERS.items() if key in curves]
    if len(phases) != 1:
        raise UserError(f"{run_dir}/metrics.jsonl has no step of a DPO or GRPO run (no {' or '.join(PHASE_MARKERS.values())}); "
                        f"pass the out_dir of a run that trained at least one step")  # fmt: skip
    return phases[0]


def draw_figure(run_dirs: list[Path], labels: list[str] | None = None):
    """The figure: a row of PHASE_PANELS per phase among the runs, each run in its own colour everywhere."""
    plt = pyplot()
    labels = labels or [Path(d).name for d in run_dirs]
    runs = [(label, read_curves(d), f"C{i % 10}") for i, (label, d) in enumerate(zip(labels, run_dirs))]
    phases = {run_dir: phase_of(run_dir, curves) for run_dir, (_, curves, _) in zip(run_dirs, runs)}
    rows = [phase for phase in PHASE_PANELS if phase in phases.values()]
    columns = max(len(PHASE_PANELS[phase]) for phase in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(4.2 * columns, 3.4 * len(rows) + 0.6),
                                squeeze=False, layout="constrained")  # fmt: skip
    for row, phase in zip(axes, rows):
        in_phase = [run for run_dir, run in zip(run_dirs, runs) if phases[run_dir] == phase]
        for axis, panel in zip(row, PHASE_PANELS[phase]):
            draw_panel(axis, panel, in_phase)
        for unused in row[len(PHASE_PANELS[phase]):]:
            unused.set_visible(False)
    figure.legend([legend_line(colour) for _, _, colour in runs], labels, loc="outside upper center", ncol=min(len(runs), 6), title="runs (one colour each)")
    return figure


def draw_panel(axis, panel, runs) -> None:
    """One panel: its quantities (a line style each) of every run (a colour each) that logged them."""
    title, keys = panel
    for label, curves, colour in runs:
        for (key, name), style in zip(keys, LINE_STYLES):
            if key in curves:
                axis.plot(*curves[key], color=colour, linestyle=style, label=f"{label}: {name}")
    axis.set_title(title, fontsize="medium")
    axis.set_xlabel("step")
    if not axis.lines:
        axis.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=axis.transAxes)
    elif len(keys) > 1:  # which line style is which quantity; the figure's legend says which colour is which run
        styles = [(name, style) for (key, name), style in zip(keys, LINE_STYLES) if any(key in run[1] for run in runs)]
        axis.legend([legend_line("0.3", style) for _, style in styles], [name for name, _ in styles], fontsize="small")


def legend_line(colour: str, style: str = "-"):
    """A line for a legend only, drawn in no panel."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, linestyle=style)


def plot_runs(run_dirs: list[Path], target: Path, labels: list[str] | None = None) -> Path:
    """One PNG of `draw_figure`; returns its path."""
    figure = draw_figure(run_dirs, labels)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    figure.savefig(temporary, dpi=100, format="png")
    pyplot().close(figure)
    temporary.replace(target)  # atomic: a reader never sees half a PNG
    return target


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: curves.png in the first RUN_DIR).")
@click.option("--names", default=None, help="Comma-separated legend names, one per training run.")
def plot_command(run_dirs, out_file, names):
    """Plot each phase's loss, rewards, KL or accuracy, grad norm and throughput against step; runs overlaid.

    RUN_DIR is a training run's out_dir, or a pipeline RUN_DIR (its dpo and grpo_* stages).

    Example: twophase plot runs/demo/grpo_random runs/demo/grpo_zero runs/demo/grpo_toy
    """
    runs = training_runs(run_dirs)
    labels = [n.strip() for n in names.split(",")] if names else None
    if labels is not None and len(labels) != len(runs):
        raise UserError(f"--names needs {len(runs)} names, one per training run ({', '.join(str(r) for r in runs)})")
    target = plot_runs(runs, Path(out_file) if out_file else Path(run_dirs[0]) / "curves.png", labels)
    click.echo(f"wrote {target} ({len(runs)} run(s): {', '.join(str(r) for r in runs)})")
