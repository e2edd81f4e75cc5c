"""How twophase reaches into a transformers/peft model: the one LoRA unwrap, the base model under an
adapter, and the one probe of the forward keywords that differ across transformers versions."""

from __future__ import annotations

import inspect
from contextlib import contextmanager


def causal_lm_of(model):
    """The underlying *ForCausalLM module, through a peft wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def reference_model(policy, frozen=None):
    """The frozen reference: `frozen` when there is one (full fine-tuning), else the policy with
    its LoRA adapter disabled, which gives exactly the base model's outputs and costs no memory."""
    if frozen is not None:
        yield frozen
    else:
        with policy.disable_adapter():
            yield policy


def forward_keywords(model) -> tuple[str, str | None]:
    """The names this transformers version gives the forward's KV cache (`cache` from 5.24, else
    `past_key_values`) and its last-logits-only switch (`logits_to_keep`, None where the model lacks it)."""
    params = inspect.signature(causal_lm_of(model).forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), ("logits_to_keep" if "logits_to_keep" in params else None)
