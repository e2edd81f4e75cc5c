"""How a model's weights live on several processes: replicated (LoRA) or sharded with FSDP2 (full fine-tuning).

One process: nothing here does anything. Under torchrun (data/base/distributed.py):

- **Replicated** (a LoRA adapter, a few MB): every rank holds all weights; after
  a step's micro-batches the loop sums the adapter's gradients over ranks once
  (`distributed.sum_gradients`: what DDP computes, without its per-layer overlap,
  which needs the forward to run through DDP's wrapper while the trainers call
  the decoder and the output head separately).
- **Sharded** (full fine-tuning): `fully_shard` (FSDP2) gives each decoder layer,
  the decoder's embeddings and norm, and the output head their own unit. Each rank
  keeps 1/N of every weight, of its gradient and of its optimizer state; a unit's
  full weights exist only while it computes (all-gathered before, freed after),
  and its gradients are reduce-scattered after every micro-batch's backward, so
  that only shards of them ever accumulate. (Reducing once, at the step's last
  micro-batch, would hold every layer's unsharded float32 gradient on every rank
  in between: 12 GiB more at one rank for the 7B, measured, and 25.7 GiB on
  every rank whatever N, which is what sharding is for.)

The loss of each micro-batch is already its share of the global step, so ranks'
gradients are *summed* (FSDP's default would average: `set_gradient_divide_factor(1)`).

The optimizer of a sharded model sees each rank's local shard as an ordinary
tensor (`LocalShards`): bitsandbytes' 8-bit AdamW, and the stochastic rounding of
trainers/infra/optim.py, work element by element, so a shard is just a smaller tensor.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.tensor import DTensor

from twophase.data.base import distributed
from twophase.data.base.model_api import causal_lm_of


def shard_model(model, device: torch.device):
    """Apply FSDP2 to a full-parameter model under torchrun (returns the same module, now sharded)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Weights stay in the dtype the trainer keeps them in (bf16 on GPU); gradients are reduced in float32.
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    lm = causal_lm_of(model)
    decoder = lm.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, mp_policy=policy)
    # The trainers call the decoder and the output head separately (losses/logprobs.py), so each is a root unit.
    fully_shard(decoder, mp_policy=policy)
    fully_shard(lm.get_output_embeddings(), mp_policy=policy, reshard_after_forward=False)  # called once per chunk
    for unit in _units(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _units(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def start_replicas(model, parameters: list[torch.nn.Parameter]) -> None:
    """Replicated training starts from rank 0's weights (a LoRA initialisation drawn differently would never be noticed)."""
    if not is_sharded(model):
        distributed.broadcast_parameters(parameters)


def finish_gradients(model, parameters: list[torch.nn.Parameter]) -> None:
    """After the step's micro-batches: every rank holds the global batch's gradient (its shard of it when sharded)."""
    if not is_sharded(model):
        distributed.sum_gradients(parameters)


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a number (a DTensor for a sharded model)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


class LocalShards:
    """The optimizer's parameters: each sharded parameter's local shard as an ordinary tensor (views, not copies).

    `hand_over_gradients()` before each optimizer step points each shard's `.grad`
    at the local part of its DTensor gradient; updates written into the shard are
    written into the model's sharded weight, since both share storage.
    """

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.pairs = [(p, torch.nn.Parameter(p.to_local(), requires_grad=False) if isinstance(p, DTensor) else p)
                      for p in parameters]  # fmt: skip
        self.parameters = [local for _, local in self.pairs]

    def hand_over_gradients(self) -> None:
        for p, local in self.pairs:
            if local is not p:
                local.data = p.to_local()  # FSDP may have re-laid its shards out since (its lazy init)
                local.grad = None if p.grad is None else p.grad.to_local()

    def drop_gradients(self) -> None:
        for p, local in self.pairs:
            if local is not p:
                local.grad = None


class GatheredCopy:
    """An ordinary (unsharded) copy of a sharded model, refreshed from the shards before each use.

    Generation decodes token by token with a KV cache (eval/engine/generation.py, eval/engine/decoder.py);
    every step of it through FSDP would all-gather each layer again, and ranks whose
    completions end at different lengths would fall out of step. So each rank decodes with
    full weights of its own: one all-gather per rollout, at the cost of one more copy of
    the weights in memory (the price of sharding training but not generation).
    """

    def __init__(self, model):
        self.model = copy.deepcopy(model)  # before sharding: the architecture and the initial weights
        self.model.requires_grad_(False)

    @torch.no_grad()
    def refresh(self, sharded) -> torch.nn.Module:
        """Copy the sharded model's current weights in place (same tensors: the decoder's caches stay valid)."""
        target = dict(self.model.named_parameters())
        for name, p in sharded.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            target[name].copy_(full)
        return self.model
