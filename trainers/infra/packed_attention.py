"""Variable-length attention over packed rows (data/packing.py), plugged into transformers.

A packed row holds many sequences end to end; each query segment attends only to its
key segment, causally, aligned to the segment's bottom-right corner. Two ways to compute
exactly that, chosen per call:

- on a GPU in bf16/fp16, PyTorch's public variable-length attention,
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; FlashAttention's kernel, with
  a backward), over the cumulative segment lengths. It computes only the blocks inside
  segments, and no mask exists at any size. Causal masking is asked for as
  `window_size=(-1, 0)` (torch >= 2.11) or `is_causal=True` (2.10, the argument's first
  name); FlashAttention aligns it bottom-right when a segment has more keys than
  queries, which is what the shared-prompt layout needs. Because a release may send
  the call to another backend (cuDNN's ragged attention aligned causal masks top-left),
  `verify_packed_attention` checks that alignment, forward and backward, before a run.
- anywhere else (the CPU, float32, float64), `scaled_dot_product_attention` one segment
  at a time with an explicit bottom-right causal mask: exact and slow, for tests and
  small runs.

`verify_packed_attention` checks the kernel's output and gradients against the reference before a GPU run.

transformers picks a model's attention function by `config._attn_implementation`, read by
every layer at call time, including when gradient checkpointing recomputes a layer during
backward. So a model that trains on packed rows is switched once, for the whole run
(`use_packed_attention`), and the segments travel with each forward call as the keyword
argument `packed_segments`, which transformers hands down to the attention function.
transformers has no mask builder for this name, so it builds no mask at all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from twophase.data.base.errors import UserError

PACKED_ATTENTION = "twophase_packed"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_TOLERANCE = 0.05  # relative: bf16 rounding is ~0.01 of the largest value; a wrong mask is off by O(1)


@dataclass(frozen=True)
class PackedSegments:
    """Where each query segment of a packed row may look; see data/packing.py."""

    cu_seq_q: torch.Tensor  # (S + 1,) int32 cumulative query segment lengths
    cu_seq_k: torch.Tensor  # (S + 1,) int32 cumulative key segment lengths
    max_q: int
    max_k: int
    key_index: torch.Tensor | None = None  # (K,) row position of every key; None: the keys are the queries

    @classmethod
    def of_batch(cls, batch: dict) -> PackedSegments:
        return cls(batch["cu_seq_q"], batch["cu_seq_k"], batch["max_q"], batch["max_k"], batch.get("key_index"))


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_segments=None, **kwargs):
    """transformers' attention-function interface: (1, H, T, D) inputs, (1, T, H, D) output, no weights."""
    if packed_segments is None:
        raise RuntimeError(
            "this model is set up for packed DPO rows (trainers/infra/packed_attention.py) and got no packed_segments; "
            "run it through trainers/dpo.py: packed_logprobs_of"
        )
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {query.shape[0]}")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, head_dim)
    if packed_segments.key_index is not None:
        k, v = k.index_select(0, packed_segments.key_index), v.index_select(0, packed_segments.key_index)
    attend = _flash_varlen if _kernel_applies(q) else segment_by_segment
    return attend(q, k, v, packed_segments, scaling).unsqueeze(0), None


def _kernel_applies(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in _KERNEL_DTYPES


def _flash_varlen(q, k, v, segments: PackedSegments, scale) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    options = _varlen_options(varlen_attn, grouped=k.shape[1] != q.shape[1])
    if k.shape[1] != q.shape[1] and "enable_gqa" not in options:  # torch 2.10: one key head per query head
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), segments.cu_seq_q, segments.cu_seq_k,
                       segments.max_q, segments.max_k, scale=scale, **options)  # fmt: skip


def _varlen_options(varlen_attn, grouped: bool) -> dict:
    """Bottom-right causal masking (and grouped-query attention) in this torch release's argument names."""
    parameters = inspect.signature(varlen_attn).parameters
    options = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if grouped and "enable_gqa" in parameters:
        options["enable_gqa"] = True
    return options


def segment_by_segment(q, k, v, segments: PackedSegments, scale) -> torch.Tensor:
    """The reference: each segment through scaled_dot_product_attention, causal from the bottom-right."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: every query head group shares a key head
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    pieces = []
    query_bounds, key_bounds = pairwise(segments.cu_seq_q.tolist()), pairwise(segments.cu_seq_k.tolist())
    for (q_start, q_end), (k_start, k_end) in zip(query_bounds, key_bounds):
        queries, keys = q_end - q_start, k_end - k_start
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - queries)
        out = F.scaled_dot_product_attention(
            *(x.transpose(0, 1) for x in (q[q_start:q_end], k[k_start:k_end], v[k_start:k_end])),
            attn_mask=allowed, scale=scale,
        )  # fmt: skip
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


def use_packed_attention(causal_lm) -> None:
    """Make every attention layer of `causal_lm` (a *ForCausalLM, not a peft wrapper) take packed rows."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    causal_lm.config._attn_implementation = PACKED_ATTENTION


def verify_packed_attention(device: torch.device) -> float:
    """Run the GPU kernel and the reference on the same random packed row; raise if they differ.

    Guards the one thing the CPU tests cannot see: that this torch build's kernel masks
    segments as the layout assumes (bottom-right causal). Returns the largest difference.
    """
    from twophase.data.packing import pack_pairs

    # uneven segments, more keys than queries, an empty chosen reply and a one-token one
    pairs = [([1] * 37, [2] * 5, [3] * 70), ([1] * 3, [2] * 150, [3]), ([1] * 200, [], [3] * 20)]
    batch = pack_pairs(pairs, share_prompt=True)
    segments = PackedSegments.of_batch({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (1, 4, batch["input_ids"].shape[1], 128)
    q, k, v = (torch.randn(shape, generator=generator, device=device).to(torch.bfloat16).requires_grad_() for _ in range(3))
    upstream = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=generator, device=device)
    try:
        fast = _output_and_gradients(q, k, v, segments, upstream)
    except (RuntimeError, ImportError) as err:  # e.g. a GPU older than FlashAttention's minimum, torch < 2.10
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"packed layouts need torch >= 2.10's variable-length attention kernel, which failed here "
                        f"({reason}); use layout: shared_prompt or stacked") from None  # fmt: skip
    exact = _output_and_gradients(*(x.detach().float().requires_grad_() for x in (q, k, v)), segments, upstream)
    # Each tensor's largest difference relative to its largest value (float32 takes the reference path).
    error = max(float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(fast, exact))
    if not error <= _KERNEL_TOLERANCE:
        raise UserError(
            f"the variable-length attention kernel of this torch build ({torch.__version__}) disagrees with the "
            f"reference by {error:.3g}; packed layouts would train on wrong numbers: use layout: shared_prompt or stacked"
        )
    return error


def _output_and_gradients(q, k, v, segments, upstream) -> list[torch.Tensor]:
    """The attention output and the gradients of <output, upstream> with respect to q, k and v."""
    output = packed_attention(None, q, k, v, None, scaling=128**-0.5, packed_segments=segments)[0]
    gradients = torch.autograd.grad((output.float() * upstream).sum(), (q, k, v))
    return [output.detach(), *gradients]
