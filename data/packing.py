"""Packed layouts: many preference pairs end to end in one row, no padding, no (T, T) mask.

HH-RLHF pairs are short and uneven (a sequence is ~136 tokens at the median and ~930 at
the most), so a padded micro-batch computes mostly padding. A packed micro-batch is a
single row holding its pairs one after another:

    packed                 [P1 C1][P1 R1][P2 C2][P2 R2] …   two sequences a pair, as TRL runs them
    packed_shared_prompt   [P1 C1 R1][P2 C2 R2] …           each prompt once, for both replies

Which token may attend to which is described by *segments*, not by a mask. The row is
cut into query segments; each attends causally to its own key segment, whose last
tokens are the segment's own queries:

    packed                 queries [Pi Ci] → keys [Pi Ci]     queries [Pi Ri] → keys [Pi Ri]
    packed_shared_prompt   queries [Pi Ci] → keys [Pi Ci]     queries [Ri]    → keys [Pi Ri]

so query j of a segment of Lq queries with Lk keys sees keys 0 … j + (Lk − Lq): causal,
aligned to the bottom-right corner. A rejected reply therefore sees its prompt and its
own earlier tokens, never the chosen reply, and no sequence sees another pair.
`key_index` lists the row positions of every key segment, end to end (only the shared
layout needs it: elsewhere the keys are the queries); `cu_seq_q` and `cu_seq_k` are the
cumulative segment lengths. That is exactly the input of a variable-length attention
kernel (trainers/infra/packed_attention.py), which computes only those blocks.

Positions restart at 0 for every sequence; in the shared layout the rejected reply
continues from the prompt (positions P, P + 1, …), as if it followed the prompt directly.
Labels follow the unshifted convention (the state at t − 1 predicts the label at t), in
two rows, because in the shared layout the first rejected token is predicted by the last
prompt token, whose successor in the row is the first chosen token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from twophase.data.tokens import IGNORE_INDEX


def packed_length(pair: Sequence[list[int]], share_prompt: bool) -> int:
    """Tokens one (prompt, chosen, rejected) pair takes in a packed row."""
    prompt, chosen, rejected = pair
    return len(prompt) * (1 if share_prompt else 2) + len(chosen) + len(rejected)


def group_by_token_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of item indices whose lengths sum to at most `budget` (order kept).

    An item longer than the budget is an error: pairs are never split across passes.
    """
    groups: list[list[int]] = []
    used = budget  # forces a new group for the first item
    for index, length in enumerate(lengths):
        if length > budget:
            raise ValueError(f"a pair of {length} tokens does not fit in a pass of {budget} tokens")
        if used + length > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


class _Row:
    """The growing lists of one packed row."""

    def __init__(self):
        self.input_ids: list[int] = []
        self.position_ids: list[int] = []
        self.pair_of_token: list[int] = []
        self.chosen_labels: list[int] = []
        self.rejected_labels: list[int] = []
        self.query_lengths: list[int] = []
        self.key_index: list[int] = []
        self.key_lengths: list[int] = []

    def add_tokens(self, ids: list[int], positions, pair: int) -> int:
        """Append tokens with no labels yet; returns the row position of the first."""
        start = len(self.input_ids)
        self.input_ids += ids
        self.position_ids += list(positions)
        self.pair_of_token += [pair] * len(ids)
        self.chosen_labels += [IGNORE_INDEX] * len(ids)
        self.rejected_labels += [IGNORE_INDEX] * len(ids)
        return start

    def add_segment(self, query_length: int, keys: list[int]) -> None:
        self.query_lengths.append(query_length)
        self.key_lengths.append(len(keys))
        self.key_index += keys

    def add_separate(self, pair: int, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        for reply, labels in ((chosen, self.chosen_labels), (rejected, self.rejected_labels)):
            length = len(prompt) + len(reply)
            start = self.add_tokens(prompt + reply, range(length), pair)
            labels[start + len(prompt) : start + length] = reply
            self.add_segment(length, list(range(start, start + length)))

    def add_shared(self, pair: int, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        p, c, r = len(prompt), len(chosen), len(rejected)
        start = self.add_tokens(prompt + chosen + rejected, [*range(p + c), *range(p, p + r)], pair)
        self.chosen_labels[start + p : start + p + c] = chosen
        self.add_segment(p + c, list(range(start, start + p + c)))
        if r:
            self.rejected_labels[start + p] = rejected[0]  # predicted by the last prompt token
            self.rejected_labels[start + p + c + 1 : start + p + c + r] = rejected[1:]
            self.add_segment(r, [*range(start, start + p), *range(start + p + c, start + p + c + r)])


def pack_pairs(pairs: Sequence[Sequence[list[int]]], share_prompt: bool) -> dict:
    """One packed row of (prompt, chosen, rejected) token-id pairs; see the module docstring.

    Returns (1, T) `input_ids`, `position_ids`, `pair_of_token`, `chosen_labels` and
    `rejected_labels`; the segments `cu_seq_q`, `cu_seq_k` (int32), `key_index` (shared
    layout only) and their longest lengths `max_q`, `max_k`; `num_pairs` and
    `pair_tokens` (prompt twice and replies once, as TRL counts them).
    """
    if not pairs:
        raise ValueError("pack_pairs got no pairs")
    row = _Row()
    for index, (prompt, chosen, rejected) in enumerate(pairs):
        if not prompt:
            # The first reply token would be predicted by the previous pair's last token.
            raise ValueError(f"pair {index} has an empty prompt; a packed pair needs at least one prompt token (BOS)")
        (row.add_shared if share_prompt else row.add_separate)(index, list(prompt), list(chosen), list(rejected))
    batch = {name: torch.tensor([getattr(row, name)], dtype=torch.long) for name in
             ("input_ids", "position_ids", "pair_of_token", "chosen_labels", "rejected_labels")}  # fmt: skip
    batch["cu_seq_q"] = _cumulative(row.query_lengths)
    batch["cu_seq_k"] = _cumulative(row.key_lengths)
    if share_prompt:
        batch["key_index"] = torch.tensor(row.key_index, dtype=torch.long)
    batch["max_q"], batch["max_k"] = max(row.query_lengths), max(row.key_lengths)
    batch["num_pairs"] = len(pairs)
    batch["pair_tokens"] = sum(packed_length(pair, share_prompt=False) for pair in pairs)
    return batch


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
