"""Loading the policy for training, LoRA, checkpointing, and its log-probabilities.

The forward pass used by both trainers runs the decoder to its last hidden
states and projects only the response positions onto the vocabulary
(losses/logprobs.py): the full (batch × length × 102,400) logits tensor is
never built.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from twophase.data.base import distributed
from twophase.data.base.compiling import compiled_or_eager
from twophase.data.base.errors import UserError
from twophase.data.base.hub import check_path_exists, load_causal_lm, load_tokenizer
from twophase.data.base.model_api import causal_lm_of
from twophase.trainers.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {name}: no CUDA GPU is visible here; use device auto (or cpu)")
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name}: this machine shows {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 weights on GPU when asked; the CPU demo keeps float32 (CPU bf16 matmuls are slow)."""
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32


def check_policy_source(config: TrainConfig) -> None:
    """A missing model path, an absent GPU, or sequences longer than the model's positions, said before any
    data or weights are read (a model's length is read from its local config.json; a hub id is checked once loaded)."""
    check_path_exists("model", config.model)
    resolve_device(config.device)
    positions = _model_positions(config.model)
    longest, what = _longest_sequence(config)
    if positions and longest > positions:
        raise UserError(f"{what} = {longest:,} tokens, but {config.model} has {positions:,} positions; lower them to fit")


def _model_positions(model: str) -> int | None:
    try:
        return int(json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _longest_sequence(config) -> tuple[int, str]:
    """The longest sequence a run feeds the model, and how the config makes it."""
    if hasattr(config, "max_new_tokens"):  # GRPO: a prompt and its completion
        return config.max_prompt_length + config.max_new_tokens, "max_prompt_length + max_new_tokens"
    return config.max_length, "max_length"


def load_policy(config: TrainConfig):
    """The model to train (LoRA-wrapped when `config.lora`), its tokenizer and device."""
    device = distributed.local_device(resolve_device(config.device))  # each rank's own GPU under torchrun
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model, dtype=weight_dtype(config.precision, device), device=device)
    return prepare_policy(model, config), tokenizer, device


def prepare_policy(model, config: TrainConfig):
    """Checkpointing, LoRA and training mode for a loaded model."""
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.lora:
        model = add_lora(model, config)
    if config.compile_layers and next(model.parameters()).device.type == "cuda":
        compile_decoder_layers(model)
    model.train()
    return model


def compile_decoder_layers(model, backend="inductor") -> int:
    """torch.compile the attention, MLP and norms of every decoder layer; returns how many layers.

    Why: a training pass of the 7B spends as much GPU time in small element-wise kernels
    (RMSNorm, RoPE, SiLU, dtype casts) as a third of its matrix products take, and
    launching ~25,000 of them a step leaves the GPU idle between kernels (BENCHMARKS.md,
    issue 25). Compiled, each block's element-wise steps fuse into a few kernels. The
    blocks are compiled, not the layer: the layer's own forward is where transformers
    applies gradient checkpointing, which must stay outside the compiled code (it
    recomputes the blocks, compiled, in the backward pass). LoRA's adapters inside the
    blocks are traced with them; a block the compiler cannot handle runs eagerly.
    """
    layers = getattr(getattr(causal_lm_of(model), "model", None), "layers", None) or []
    for layer in layers:
        for name in COMPILED_BLOCKS:
            block = getattr(layer, name, None)
            if block is not None:
                block.forward = compiled_or_eager(block.forward, dynamic=None, backend=backend)
    return len(layers)


COMPILED_BLOCKS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, by whichever name this transformers version uses."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, config.lora_target_modules, config.model)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def check_lora_targets(model, targets, model_name: str) -> None:
    """Each LoRA target must name modules of this model (as peft matches them: the end of a dotted name)."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"lora_target_modules: {model_name} has no module named {', '.join(missing)}; "
            f"its linear layers are {', '.join(linear)}"
        )


def frozen_copy(model):
    """A reference model for full fine-tuning: a copy that never trains."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
