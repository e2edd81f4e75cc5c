"""`twophase dpo` and `twophase grpo`: train from a YAML config with `--set` overrides."""

from __future__ import annotations

import json

import click

from trainers.config import DPOConfig, GRPOConfig, load_config

CONFIG_HELP = "YAML file of config keys (see launch/configs/ and the README's table of keys)."
SET_HELP = "Override one config key, e.g. --set lr=1e-6 --set max_steps=10 (repeatable)."
RESUME_HELP = "Continue from the last checkpoint in out_dir (exactly where it stopped)."


@click.command("dpo")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", is_flag=True, help=RESUME_HELP)
def dpo_command(config_path, overrides, resume):
    """Phase 1: LoRA DPO on HH-RLHF.

    Writes OUT_DIR/metrics.jsonl (one line per step), OUT_DIR/checkpoints/,
    OUT_DIR/adapter/ and, with merge_after, OUT_DIR/merged/ (a full model).

    Example: twophase dpo --config launch/configs/wu17_v5_dpo.yaml --set max_steps=10
    """
    from trainers.dpo import run_dpo

    config = load_config(DPOConfig, config_path, overrides)
    report_outputs(run_dpo(config, resume=resume))


@click.command("grpo")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", is_flag=True, help=RESUME_HELP)
def grpo_command(config_path, overrides, resume):
    """Phase 2: GRPO on Lean theorem statements with a chosen reward.

    Writes OUT_DIR/metrics.jsonl, OUT_DIR/samples.jsonl (every completion with
    its reward), OUT_DIR/checkpoints/ and OUT_DIR/model/ (or adapter/).

    Example: twophase grpo --config launch/configs/wu17_v5_grpo_random.yaml
    """
    from trainers.grpo import run_grpo

    config = load_config(GRPOConfig, config_path, overrides)
    report_outputs(run_grpo(config, resume=resume))


def report_outputs(outputs: dict) -> None:
    last = outputs.pop("last_metrics", {}) or {}
    if last:
        click.echo("final step: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}))
    click.echo("outputs:")
    for name, path in outputs.items():
        click.echo(f"  {name:<10} {path}")
