"""`twophase dpo` and `twophase grpo`: train from a YAML config with `--set` overrides.

Each run records its provenance in OUT_DIR/manifest.json (launch/provenance.py); a
Ctrl-C or SIGTERM says where the checkpoint is and the exact command that resumes it.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import click

from twophase.trainers.config import DPOConfig, GRPOConfig, load_config
from twophase.trainers.infra.run import readable_number

CONFIG_HELP = "YAML file of config keys (see launch/configs/ and launch/README.md's table of keys)."
SET_HELP = "Override one config key, e.g. --set lr=1e-6 --set max_steps=10 (repeatable)."
RESUME_HELP = "Continue from the last checkpoint in out_dir (exactly where it stopped)."


@click.command("dpo")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", is_flag=True, help=RESUME_HELP)
def dpo_command(config_path, overrides, resume):
    """Phase 1: LoRA DPO on HH-RLHF or your own preference data.

    Writes OUT_DIR/metrics.jsonl (one line per step), OUT_DIR/checkpoints/,
    OUT_DIR/adapter/ and, with merge_after, OUT_DIR/merged/ (a full model).

    Example: twophase dpo --config launch/configs/wu17_v5_dpo.yaml --set max_steps=10
    """
    from twophase.trainers.dpo import run_dpo

    config = load_config(DPOConfig, config_path, overrides)
    _train("dpo", run_dpo, config, config_path, overrides, resume)


@click.command("grpo")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", is_flag=True, help=RESUME_HELP)
def grpo_command(config_path, overrides, resume):
    """Phase 2: GRPO on Lean theorem statements or your own prompts, with a chosen reward.

    Writes OUT_DIR/metrics.jsonl, OUT_DIR/samples.jsonl (every completion with
    its reward), OUT_DIR/checkpoints/ and OUT_DIR/model/ (or adapter/).

    Example: twophase grpo --config launch/configs/wu17_v5_grpo_random.yaml
    """
    from twophase.trainers.grpo import run_grpo

    config = load_config(GRPOConfig, config_path, overrides)
    _train("grpo", run_grpo, config, config_path, overrides, resume)


def _train(name: str, run, config, config_path, overrides, resume: bool) -> None:
    from twophase.launch.provenance import recorded_run
    from twophase.trainers.infra.reporting import check_reporters

    check_reporters(config.report_to)  # a missing optional package is said before the model loads
    try:
        with recorded_run(name, config.out_dir, dataclasses.asdict(config), config.seed, "config.json") as outputs:
            result = run(config, resume=resume)
            outputs.update({key: value for key, value in result.items() if isinstance(value, str)})  # the paths
    except KeyboardInterrupt:
        click.echo(interrupted_message(name, config.out_dir, config_path, overrides), err=True)
        raise SystemExit(130) from None
    report_outputs(result)


def interrupted_message(name: str, out_dir, config_path, overrides) -> str:
    """Where the run's newest checkpoint is and the command that continues from it."""
    from twophase.trainers.infra.checkpoint import list_checkpoints

    command = ["twophase", name] + (["--config", str(config_path)] if config_path else [])
    for item in overrides:
        command += ["--set", item]
    checkpoints = list_checkpoints(Path(out_dir) / "checkpoints")
    if not checkpoints:
        return f"interrupted before the first checkpoint; nothing to resume: rerun with: {shlex.join(command)}"
    return (f"interrupted: the newest checkpoint is {checkpoints[-1]}; continue with: "
            f"{shlex.join(command + ['--resume'])}")  # fmt: skip


def report_outputs(outputs: dict) -> None:
    outputs = dict(outputs)
    last = outputs.pop("last_metrics", {}) or {}
    if last:
        click.echo("final step: " + ", ".join(f"{key} {readable_number(value)}" for key, value in last.items()))
    click.echo("outputs:")
    for name, path in outputs.items():
        click.echo(f"  {name:<10} {path}")
