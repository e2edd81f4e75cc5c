"""Token-level rules shared by training, generation and evaluation: BOS, truncation, padding, positions.

One rule each, used everywhere a prompt becomes token ids:

- A prompt starts with exactly one BOS when the tokenizer uses one. Chat
  templates often write the BOS text themselves; tokenizing that text with
  special tokens would give two, a sequence the model never saw in training.
- A prompt that is too long keeps its end (the question is at the end) and its
  leading BOS.
- Batches for generation and scoring are padded on the left, so every row's
  last prompt token is in the same column, and position ids count real tokens
  only: a padded row sees exactly the positions it would see alone.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of a position that is not trained on (prompt, padding): torch's cross-entropy default


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids with the tokenizer's usual special tokens and never a doubled BOS.

    When the text already starts with the BOS text (a chat template wrote it), that text
    is removed before tokenizing and the BOS id is put back once, even for a tokenizer
    that does not add BOS on its own, since the template asked for it.
    """
    bos_text, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    text_has_bos = bool(bos_text) and bos_id is not None and text.startswith(bos_text)
    if text_has_bos:
        text = text[len(bos_text) :]
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if text_has_bos and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
    while bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        del ids[0]
    return ids


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Ids of text that follows a prompt: no special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def keep_end(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The last `limit` tokens, still starting with BOS if the sequence did."""
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - limit + 1 :]
    return ids[len(ids) - limit :]


def pad_id_of(tokenizer) -> int:
    """The pad id; EOS when the tokenizer has none (padding is masked, so any valid id will do)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of left-padded rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device), positions_from_mask(mask).to(device)
