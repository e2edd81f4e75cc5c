"""Log-probabilities of label tokens, computed only where they are needed.

A causal LM's logits at position t predict the token at t + 1, so the label of
position t is `labels[:, t + 1]`. Labels equal to −100 (prompt and padding)
are masked: they get log-probability 0 and do not count.

Memory is the whole point of this module. DeepSeek-Prover-V2-7B has a
vocabulary of 102,400: the float32 logits of 16 sequences of 1,024 tokens
would take 6.7 GB. So we

1. select the response positions first (prompt positions never reach the
   vocabulary projection when we start from hidden states), and
2. go through those positions in chunks, upcasting one chunk to float32 at a
   time, computing log p(y) = logit_y − logsumexp(logits), and
3. wrap each chunk in activation checkpointing when gradients are needed, so
   the backward pass recomputes a chunk's logits instead of keeping them all.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from twophase.data.base.model_api import causal_lm_of
from twophase.data.tokens import IGNORE_INDEX, positions_from_mask

DEFAULT_CHUNK_SIZE = 1024  # rows of the vocabulary projection upcast at once: 1024 × 102,400 × 4 B = 420 MB


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T−1) boolean mask of the positions whose next token is a label."""
    return labels[:, 1:] != IGNORE_INDEX


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log p(labels[:, t+1] | prefix) for every position t, from (B, T, V) logits.

    Returns a (B, T−1) float32 tensor (float64 for float64 logits) with 0 at masked positions.
    """
    mask = response_mask(labels)
    rows = logits[:, :-1][mask]  # (N, V): only response positions, still in the logits' dtype
    targets = labels[:, 1:][mask]
    values = _chunked(_logprobs_of_rows, rows, targets, chunk_size)
    return _scatter(values, mask)


def token_logprobs_from_hidden(
    hidden: torch.Tensor, output_layer, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Like `token_logprobs`, but from the last hidden states (B, T, H) and the output projection.

    `output_layer` is the (V, H) weight or the module itself (e.g. `lm_head`,
    possibly wrapped by an adapter). Only response positions are projected onto
    the vocabulary, so the full logits tensor never exists, in any dtype.
    """
    mask = response_mask(labels)
    rows = hidden[:, :-1][mask]  # (N, H)
    targets = labels[:, 1:][mask]
    if isinstance(output_layer, torch.Tensor):
        weight = output_layer
        output_layer = lambda h: h @ weight.T  # noqa: E731
    values = _chunked(lambda h, y: _logprobs_of_rows(output_layer(h), y), rows, targets, chunk_size)
    return _scatter(values, mask)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean, when `average`) of per-token log-probabilities over each sequence's response."""
    total = (token_logps * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def _logprobs_of_rows(logits_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for each row, in float32 or wider: logit_target − logsumexp(logits)."""
    logits_rows = logits_rows.to(torch.promote_types(logits_rows.dtype, torch.float32))  # float64 stays float64
    target_logits = logits_rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return target_logits - torch.logsumexp(logits_rows, dim=-1)


def _chunked(fn: Callable, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    if rows.shape[0] == 0:
        return rows.new_zeros(0, dtype=torch.promote_types(rows.dtype, torch.float32))
    needs_grad = torch.is_grad_enabled() and rows.requires_grad
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        piece_rows, piece_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if needs_grad:
            # Recompute this chunk's logits in backward rather than keeping every chunk's float32 copy.
            pieces.append(checkpoint(fn, piece_rows, piece_targets, use_reentrant=False))
        else:
            pieces.append(fn(piece_rows, piece_targets))
    return torch.cat(pieces)


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device)
    return out.masked_scatter(mask, values)


def token_logprobs_of(model, input_ids, attention_mask, labels, chunk_size: int) -> torch.Tensor:
    """(B, T−1) log-probabilities of `labels` under `model`, 0 where labels are −100."""
    lm = causal_lm_of(model)
    # Positions count real tokens only, as in generation (data/tokens.py: one rule for both).
    position_ids = positions_from_mask(attention_mask)
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return token_logprobs_from_hidden(hidden, lm.get_output_embeddings(), labels, chunk_size)
