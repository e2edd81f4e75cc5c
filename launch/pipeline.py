"""`twophase pipeline` and `twophase status`: the whole two-phase experiment as one resumable command.

launch/experiment.py turns the config into stages; launch/stages.py runs them,
skips the done ones, resumes the interrupted one and reports each one's state.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from twophase.launch.experiment import PipelineConfig, load_pipeline
from twophase.launch.manifest import is_done, read_manifest
from twophase.launch.stages import Stage, run_stages, status_lines


def execute(config: PipelineConfig, stages: list[Stage], only: str | None = None) -> None:
    """Run the pipeline and report: the tables once they exist, each stage's state, where the outputs are."""
    started = time.time()
    try:
        run_stages(Path(config.run_dir), stages, dataclasses.asdict(config), only)
    except KeyboardInterrupt:
        click.echo(interrupted_message(Path(config.run_dir), stages), err=True)
        sys.exit(130)
    run_dir = Path(config.run_dir)
    tables = read_manifest(run_dir / "tables")
    if only in (None, "tables") and is_done(tables):
        from twophase.launch.tables import print_tables

        print_tables([path for path in tables["outputs"].values() if path.endswith(".md")], echo=click.echo)
    click.echo("\n" + "\n".join(status_lines(run_dir)))
    click.echo(f"\nfinished in {time.time() - started:.0f} s; outputs in {run_dir} (twophase status {run_dir})")


def interrupted_message(run_dir: Path, stages: list[Stage]) -> str:
    """Which stage stopped, where its newest checkpoint is, and the command that continues (the same one)."""
    import shlex

    from twophase.trainers.infra.checkpoint import list_checkpoints

    command = shlex.join(["twophase", *sys.argv[1:]])
    for stage in stages:
        if (read_manifest(run_dir / stage.name) or {}).get("status") == "interrupted":
            checkpoints = list_checkpoints(run_dir / stage.name / "checkpoints")
            where = f"its newest checkpoint is {checkpoints[-1]}" if checkpoints else "it had no checkpoint yet"
            return f"interrupted: stage {stage.name} stopped, {where}; continue with the same command: {command}"
    return f"interrupted: continue with the same command: {command}"


@click.command("pipeline")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Pipeline YAML: run_dir, model, seed and the sections eval, dpo, grpo, conditions.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key, dotted into its section: --set dpo.max_steps=10 --set eval.limit=20 (repeatable).")
@click.option("--stage", "only", default=None, metavar="NAME",
              help="Run only this stage, once the stages it needs are done (what each `twophase slurm` job does).")
def pipeline_command(config_path, overrides, only):
    """The whole experiment: evaluate the original model, DPO + merge, evaluate,
    GRPO under each reward condition, evaluate each, comparison tables.

    Every stage writes RUN_DIR/<stage>/ with a manifest.json. Rerunning the same
    command skips done stages and resumes an interrupted one from its last
    checkpoint; a failed stage stops the pipeline with its reason.

    Example: twophase pipeline --config launch/configs/wu17_v5.yaml --set conditions.fv.reward_options.lean.project_dir=/opt/mathlib
    """
    config, stages = load_pipeline(config_path, overrides)
    execute(config, stages, only)


@click.command("status")
@click.argument("run_dir", type=click.Path(file_okay=False))
def status_command(run_dir):
    """Show the state of each stage of the pipeline run in RUN_DIR."""
    for line in status_lines(Path(run_dir)):
        click.echo(line)
