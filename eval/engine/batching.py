"""How many rows the eval engines run at once when `batch_size` is "auto" (the default).

Decoding reads every weight once per step whatever the number of rows, so
rows are nearly free until their KV cache fills the card: on one H100 the 7B
layout generates 1,241 tokens/s at 8 rows, 7,359 at 64 and 14,436 at 256
(BENCHMARKS.md). Scoring (log-likelihood) is one forward pass per batch and
is compute-bound once a batch holds a few thousand tokens. So "auto" means:

* generation: the largest power of two of rows, at most 256, whose KV cache
  (rows × columns × bytes per cached token) fits in 75 % of the memory
  available (free on the device, cached by PyTorch's allocator, or held by
  the engine's own cache, which a new batch size replaces); the rest is for
  the prefill's activations, the sampler and the CUDA graphs;
* scoring: at most 64 rows, and no more tokens than half the available
  memory holds at the forward pass's peak per token (the MLP's three
  intermediate vectors and four hidden-size vectors, in the weights' dtype),
  counting each row's kept logits (float32, twice) as well.

On a CPU, "auto" is 8 rows for both engines. A number instead of "auto" is
used as it is. Under torchrun every rank takes rank 0's choice, so every rank
cuts the same batches (eval/engine/generation.py, eval/engine/loglikelihood.py).
"""

from __future__ import annotations

import torch

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.model_api import causal_lm_of

AUTO = "auto"
MAX_GENERATION_ROWS = 256  # the measured best (see above); more rows were not measured
MAX_SCORING_ROWS = 64
CPU_ROWS = 8
CACHE_SHARE = 0.75
SCORING_SHARE = 0.5


def check_batch_size(value, name: str = "batch_size"):
    """`value` as the engines take it: "auto" or a whole number >= 1; anything else is one UserError."""
    if value == AUTO:
        return AUTO
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} = {value!r} must be 'auto' or a whole number of at least 1")
    return value


def available_bytes(device: torch.device, held: int = 0) -> int:
    """Memory a batch may use: free on the device, cached free by PyTorch's allocator, and `held` (to be replaced)."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached + held


def _element_size(model) -> int:
    return next(model.parameters()).element_size()


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer."""
    config = causal_lm_of(model).config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * _element_size(model)


def rows_per_batch(batch_size, generator, group: list[dict]) -> int:
    """The rows of each batch of `group` (the engine's rows, longest prompt first): `batch_size`, or "auto"."""
    if batch_size != AUTO:
        return batch_size
    columns = len(group[0]["ids"]) + max(row["max_new"] for row in group)
    cache = (getattr(generator.decoder, "kv", None), getattr(generator.decoder, "qkv_weight", None))
    held = sum(t.numel() * t.element_size() for t in cache if t is not None)  # replaced if the batch size changes
    return generation_rows(generator.model, columns, held)


def generation_rows(model, columns: int, held: int = 0) -> int:
    """Rows to decode at once for prompts + new tokens of `columns` columns (a power of two, 1..256)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return CPU_ROWS
    rows = rows_that_fit(columns * kv_bytes_per_token(model), CACHE_SHARE * available_bytes(device, held))
    return distributed.broadcast_from_main(rows)


def rows_that_fit(bytes_per_row: int, budget: float, most: int = MAX_GENERATION_ROWS) -> int:
    """The largest power of two of rows, at most `most`, whose bytes fit the budget (at least 1)."""
    rows = most
    while rows > 1 and rows * bytes_per_row > budget:
        rows //= 2
    return rows


def scoring_budget(model) -> tuple[int, int, int] | None:
    """(most rows, bytes available, bytes of one token's forward-pass peak) for scoring; None: fixed rows (CPU)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    config = causal_lm_of(model).config
    per_token = (3 * config.intermediate_size + 4 * config.hidden_size) * _element_size(model)
    budget = int(SCORING_SHARE * available_bytes(device))
    return distributed.broadcast_from_main((MAX_SCORING_ROWS, budget, per_token))


def scoring_batches(lengths: list[int], keeps: list[int], vocab_size: int, budget) -> list[list[int]]:
    """Row indices in batches, longest first; each batch within the budget's rows and bytes.

    A row costs its tokens' forward-pass peak plus its kept positions' logits
    (float32 logits and their log-softmax). Rows are sorted by length, so the
    first row of a batch is its longest and every row pads to it.
    """
    most_rows, available, per_token = budget
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch:
            width, keep = lengths[batch[0]], max(keeps[j] for j in batch + [i])
            cost = (len(batch) + 1) * (width * per_token + keep * vocab_size * 8)
            if len(batch) < most_rows and cost <= available:
                batch.append(i)
                continue
        batches.append([i])
    return batches
