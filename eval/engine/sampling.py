"""Choosing the next token: greedy, or a seeded sample with temperature, top-k and top-p.

Everything here is a pure function of device tensors, with no host round trip,
so the choice can run inside a captured CUDA graph together with the forward
pass (eval/engine/decoder.py).

Sampling uses the Gumbel-max trick: with g_v independent standard Gumbel noise,

    argmax_v (logits_v / T + g_v)  is distributed as  softmax(logits / T),

and top-k / top-p only set the excluded logits to −inf first, which gives the
renormalised filtered distribution. The noise is not drawn from a stateful
generator but computed by hashing (row seed, token index, vocabulary id):

    u = hash(seed, index, v) / 2^24 ∈ (0, 1),    g_v = −log(−log u)

so a row's samples depend only on its own seed and on its logits — not on the
batch it ran in, the order of requests, or how many steps were captured in a
graph — and two runs with one seed give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2^31, so a 32-bit value times one fits in int64 without overflow.
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)
_GOLDEN = 0x9E3779B1  # spreads consecutive vocabulary ids before hashing


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 = greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def check(self) -> "SamplingParams":
        from twophase.data.base.errors import UserError

        if self.temperature < 0 or self.temperature != self.temperature:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        return self


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift / multiply rounds) on int64 tensors holding values < 2^32."""
    for multiplier in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 15)


def row_keys(seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B,) 32-bit keys of (row seed, token index): one independent noise stream per row and position."""
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    return mix32(mix32(low ^ mix32(high)) ^ (index & _MASK32))


def vocabulary_keys(vocab_size: int, device) -> torch.Tensor:
    """(V,) hashed vocabulary ids; computed once per engine, combined with the row keys every step."""
    ids = torch.arange(vocab_size, device=device, dtype=torch.int64)
    return mix32((ids * _GOLDEN) & _MASK32)


def uniform_noise(keys: torch.Tensor, vocab_keys: torch.Tensor) -> torch.Tensor:
    """(B, V) float32 uniforms in (0, 1), one per (row key, vocabulary id)."""
    bits = mix32(keys[:, None] ^ vocab_keys[None, :]) >> 8  # 24 random bits: exact in float32
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to −inf every logit outside the top-k, then outside the top-p nucleus (float32 in, float32 out)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # The smallest logit the nucleus keeps (the most likely token always stays: its mass before is 0).
        # Cutting by value keeps every token tied with it, so the result never depends on how ties were sorted.
        cutoff = sorted_logits.masked_fill(mass_before >= top_p, float("inf")).min(dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor,
    sampling: SamplingParams,
    seeds: torch.Tensor,
    index: torch.Tensor,
    vocab_keys: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row and its log-probability under the model (temperature 1, no filter).

    logits: (B, V) float32; seeds: (B,) int64; index: the position of the token
    being chosen among the generated ones (a scalar or (B,) int64 tensor).
    The returned log-probability is log softmax(logits)[token]: what the training
    forward computes for the same token, whatever temperature sampled it.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        scaled = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
        keys = row_keys(seeds, index.expand_as(seeds))
        gumbel = -torch.log(-torch.log(uniform_noise(keys, vocab_keys)))
        tokens = (scaled + gumbel).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
