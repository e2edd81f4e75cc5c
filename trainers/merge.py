"""Merging a LoRA adapter into its base model: W' = W + (alpha / r) · B A.

The merged model is saved as an ordinary safetensors checkpoint with its
tokenizer, loadable by `AutoModelForCausalLM.from_pretrained` with no peft
installed. Phase 2 starts from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from twophase.data.base.errors import UserError
from twophase.data.base.files import atomic_write_text
from twophase.data.base.hub import how_trained, is_adapter_dir, load_adapter_model, save_model
from twophase.data.base.progress import say


MERGE_DTYPES = ("bfloat16", "float16", "float32")
REPORT_FILE = "merge_report.json"


def merge_in_memory(peft_model, tokenizer, out_dir: Path, dtype: str | None = None, trained: dict | None = None) -> Path:
    """Merge the adapter of a live peft model into its weights and save them in `dtype` (default: the weights' own).

    The sum W + ΔW is formed in float32 and rounded to `dtype` once, so the
    saved weights are round(W + ΔW), the best that dtype can hold. The model
    is changed. OUT/merge_report.json says how much of the LoRA update the
    saved weights still carry (`merge_fidelity`).
    """
    import torch

    if dtype is not None and dtype not in MERGE_DTYPES:
        raise UserError(f"merge dtype {dtype!r} is not one of: {', '.join(MERGE_DTYPES)}")
    target = getattr(torch, dtype) if dtype else next(peft_model.parameters()).dtype
    report = merge_fidelity(peft_model, target)
    merged = peft_model.to(torch.float32).merge_and_unload().to(target)
    path = save_model(merged, tokenizer, out_dir, trained)  # the adapter's twophase.json, if it has one
    atomic_write_text(Path(path) / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    if report["relative_error_of_update"] > 0.01:
        say(f"merge: in {report['dtype']}, the merged weights keep {report['update_fraction_kept']:.1%} of the "
                   f"adapter's update (relative error {report['relative_error_of_update']:.2f}, rounding); "
                   f"merge in float32 to keep it exactly")  # fmt: skip
    return path


def merge_fidelity(peft_model, dtype) -> dict:
    """How much of the LoRA update ΔW survives W + ΔW being rounded to `dtype`, over all LoRA layers.

    With applied = round(W + ΔW) − round(W), the change the merged weights
    carry over the base model in that dtype:

      relative_error_of_update = ‖applied − ΔW‖ / ‖ΔW‖     (0: exact)
      update_fraction_kept     = ⟨applied, ΔW⟩ / ‖ΔW‖²     (1: all of it; 0: rounding erased it)

    A LoRA update trained at a small learning rate can be smaller than half
    the spacing of bf16 numbers near the base weights: round(W + ΔW) is then
    round(W), and the merged model is the base model, not the trained one.
    """
    import torch

    lost, kept, total = 0.0, 0.0, 0.0
    with torch.no_grad():
        for module in peft_model.modules():
            if not hasattr(module, "get_delta_weight") or not getattr(module, "active_adapters", None):
                continue
            weight = module.get_base_layer().weight.double()
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).double()
                applied = (weight + delta).to(dtype).double() - weight.to(dtype).double()
                lost += float((applied - delta).pow(2).sum())
                kept += float((applied * delta).sum())
                total += float(delta.pow(2).sum())
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "relative_error_of_update": (lost / total) ** 0.5 if total > 0 else 0.0,
        "update_fraction_kept": kept / total if total > 0 else 1.0,
    }


def merge_adapter(adapter_dir: str, out_dir: str, base: str | None = None, dtype: str = "bfloat16") -> Path:
    """Load `base` (default: the adapter's recorded base model), apply the adapter, merge in `dtype`, save."""
    import torch

    if not is_adapter_dir(adapter_dir):
        raise UserError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json); pass --adapter OUT_DIR/adapter")
    peft_model, tokenizer = load_adapter_model(str(adapter_dir), base=base, dtype=torch.float32)
    return merge_in_memory(peft_model, tokenizer, Path(out_dir), dtype=dtype, trained=how_trained(adapter_dir))
