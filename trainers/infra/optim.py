"""Optimizers and learning-rate schedules, and why bf16 weights need stochastic rounding.

A bf16 number has 8 significant bits: a weight of 0.02 can only move in
steps of about 6e-5. AdamW's update is about lr per step, so at lr = 1e-6
(the Phase 2 setting) rounding to nearest throws almost every update away
and full fine-tuning in bf16 barely changes the model. Keeping float32 master
weights would cost 4 more bytes per parameter (28 GB for 7B).

Stochastic rounding costs nothing to store: the optimizer updates each bf16
parameter in float32 (one tensor at a time), then rounds the result up or
down with probabilities proportional to its distance from the two
neighbouring bf16 values, so E[round(x)] = x and small updates survive on
average (Gupta et al., 2015; Zamirai et al., 2020).
"""

from __future__ import annotations

import math

import torch

from twophase.data.base.errors import UserError

_ROUNDING_CHUNK = 1 << 24  # elements rounded at once: bounds the temporary random bits to 64 MB


def stochastic_round_to_bf16_(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Write float32 `source` into bf16 `target`, rounding stochastically (unbiased).

    A float32's upper 16 bits are its bf16 truncation. Adding uniform random
    16-bit noise to the lower bits before truncating carries into the upper
    bits with probability (lower bits) / 2^16: exactly the distance to the
    next bf16 value, in units of its spacing. Sign-magnitude layout makes
    this work for negative numbers too.
    """
    flat_source, flat_target = source.reshape(-1), target.view(-1)
    for start in range(0, flat_source.numel(), _ROUNDING_CHUNK):
        bits = flat_source[start : start + _ROUNDING_CHUNK].contiguous().view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
        truncated = (bits + noise) & -65536  # -65536 == 0xFFFF0000: keep the upper 16 bits
        flat_target[start : start + _ROUNDING_CHUNK] = truncated.view(torch.float32).to(torch.bfloat16)
    return target


def build_optimizer(parameters, config) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, weight_decay=config.weight_decay
    )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise UserError(f"optimizer adamw8bit needs bitsandbytes ({err}); install it, or pass --set optimizer=adamw") from None
    if config.stochastic_rounding:
        return _stochastic_rounding_adamw8bit(bnb)(parameters, **kwargs)
    return bnb.optim.AdamW8bit(parameters, **kwargs)


def _stochastic_rounding_adamw8bit(bnb):
    class StochasticRoundingAdamW8bit(bnb.optim.AdamW8bit):
        """bitsandbytes' 8-bit AdamW; bf16 parameters are updated in float32 and rounded stochastically."""

        def update_step(self, group, p, gindex, pindex):
            if p.dtype != torch.bfloat16:
                return super().update_step(group, p, gindex, pindex)
            weights, grad = p.data, p.grad
            p.data = weights.float()  # the data first: a grad must match its parameter's dtype
            p.grad = grad.float()
            try:
                super().update_step(group, p, gindex, pindex)
                updated = p.data
            finally:
                p.data = weights
                p.grad = grad
            stochastic_round_to_bf16_(weights, updated)

    return StochasticRoundingAdamW8bit


def build_scheduler(optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `warmup_steps`, then constant, linear decay to 0, or cosine decay to 0."""
    warmup, total, schedule = config.warmup_steps, config.max_steps, config.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
