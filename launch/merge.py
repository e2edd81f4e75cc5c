"""`twophase merge`: fold a LoRA adapter into its base model and save a plain checkpoint."""

from __future__ import annotations

import click


@click.command("merge")
@click.option("--adapter", required=True, type=click.Path(), help="Adapter directory written by `twophase dpo` (OUT_DIR/adapter).")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Where to write the merged model.")
@click.option("--base", default=None, help="Base model path or hub id (default: the one recorded in the adapter).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of the merged weights; float32 keeps small LoRA updates that bf16 rounding would lose.")
def merge_command(adapter, out_dir, base, dtype):
    """Merge a LoRA adapter into its base model.

    The result (safetensors weights, config and tokenizer) loads with
    AutoModelForCausalLM.from_pretrained and is Phase 2's starting point.
    """
    from twophase.trainers.merge import merge_adapter

    path = merge_adapter(adapter, out_dir, base=base, dtype=dtype)
    click.echo(f"merged model written to {path}")
