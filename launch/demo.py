"""`twophase demo`: the experiment in miniature, on the CPU, with no network.

A tiny Llama-architecture model and tokenizer are built from scratch
(data/tiny.py) and trained with exactly the code paths of the real run: LoRA
DPO on the bundled HH-format pairs (data/samples/hh_demo.jsonl), then the
merge. Every setting below is an ordinary config key; only the sizes differ
from launch/configs/wu17_v5_dpo.yaml.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import click

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"

DEMO_DPO = dict(
    dataset=str(SAMPLES / "hh_demo.jsonl"),
    max_steps=40,
    micro_batch_size=4,
    grad_accum_steps=2,
    lr=5e-4,
    lr_schedule="constant",
    warmup_steps=0,
    lora_r=8,
    lora_alpha=16,
    max_length=256,
    max_prompt_length=160,
    precision="fp32",
    device="cpu",
    optimizer="adamw8bit",
    save_every=20,
    log_every=5,
    merge_after=True,
)


@click.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(), help="Output directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a DPO config key of the demo.")
def demo_command(out_dir, overrides):
    """Run Phase 1 (LoRA DPO + merge) on a tiny model, CPU only, offline, in about a minute."""
    from data.tiny import write_tiny_model
    from launch.train import report_outputs
    from trainers.config import DPOConfig, make_config, parse_overrides
    from trainers.dpo import run_dpo

    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    out = Path(out_dir)
    started = time.time()
    click.echo(f"building the tiny model and tokenizer in {out / 'tiny-model'}")
    model_dir = write_tiny_model(out / "tiny-model")
    values = dict(DEMO_DPO, model=model_dir, out_dir=str(out / "dpo"), **parse_overrides(overrides))
    config = make_config(DPOConfig, values, source="--set")
    outputs = run_dpo(config, resume=(out / "dpo" / "checkpoints").exists())
    report_outputs(outputs)
    click.echo(f"demo finished in {time.time() - started:.0f} s; metrics per step are in {out / 'dpo' / 'metrics.jsonl'}")
