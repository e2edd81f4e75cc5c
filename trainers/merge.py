"""Merging a LoRA adapter into its base model: W' = W + (alpha / r) · B A.

The merged model is saved as an ordinary safetensors checkpoint with its
tokenizer, loadable by `AutoModelForCausalLM.from_pretrained` with no peft
installed. Phase 2 starts from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from data.errors import UserError
from data.hub import load_causal_lm, load_tokenizer
from trainers.checkpoint import atomic_directory, atomic_write_text


def merge_in_memory(peft_model, tokenizer, out_dir: Path) -> Path:
    """Merge the adapter of a live peft model into its weights and save it (the model is changed)."""
    error = merge_rounding_error(peft_model)
    merged = peft_model.merge_and_unload()
    path = save_model(merged, tokenizer, out_dir)
    dtype = str(next(merged.parameters()).dtype).replace("torch.", "")
    report = {"dtype": dtype, "relative_error_of_update": error}
    atomic_write_text(Path(path) / "merge_report.json", json.dumps(report, indent=2) + "\n")
    if error > 0.01:
        tqdm.write(f"merge: in {dtype}, the merged weights carry the adapter's update with relative error {error:.2f} "
              f"(rounding); merge with --dtype float32 to keep it exactly")  # fmt: skip
    return path


def merge_rounding_error(peft_model) -> float:
    """‖(round(W + ΔW) − W) − ΔW‖ / ‖ΔW‖ over all LoRA layers: how much of the update rounding loses.

    A LoRA update trained at a small learning rate can be smaller than the
    spacing of bf16 numbers near the base weights, and then the merged model
    is not the trained model. 0 means the merge is exact.
    """
    import torch

    lost, total = 0.0, 0.0
    with torch.no_grad():
        for module in peft_model.modules():
            if not hasattr(module, "get_delta_weight") or not getattr(module, "active_adapters", None):
                continue
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).float()
                merged = (weight.float() + delta).to(weight.dtype).float()
                lost += float(((merged - weight.float()) - delta).pow(2).sum())
                total += float(delta.pow(2).sum())
    return (lost / total) ** 0.5 if total > 0 else 0.0


def merge_adapter(adapter_dir: str, out_dir: str, base: str | None = None, dtype: str = "bfloat16") -> Path:
    """Load `base` (default: the adapter's recorded base model), apply the adapter, merge, save."""
    import torch
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json); pass --adapter OUT_DIR/adapter")
    base = base or json.loads(config_file.read_text())["base_model_name_or_path"]
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    model = load_causal_lm(base, dtype=torch_dtype)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    tokenizer = load_tokenizer(str(tokenizer_source))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    return merge_in_memory(peft_model, tokenizer, Path(out_dir))


def save_model(model, tokenizer, out_dir: Path) -> Path:
    with atomic_directory(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
