"""Turn preference pairs into the batch of one forward pass, in one of four batch layouts.

`PreferenceCollator(tokenizer, layout=...)(pairs)` tokenizes and truncates the pairs,
then lays them out (`LAYOUTS`):

- "stacked": (2B, T) padded rows; rows 0..B-1 are prompt + chosen reply, rows B..2B-1
  prompt + rejected reply, so the policy (and the reference model) score both halves of
  every pair in one call. This is what TRL does.
- "shared_prompt": (B, T) padded rows [prompt][chosen][rejected] with a (B, T, T) mask,
  so each prompt is computed once (`pack_shared_prompt`).
- "packed" and "packed_shared_prompt": all pairs end to end in one unpadded row, with
  variable-length attention segments instead of a mask (data/packing.py).

Every layout gives the same per-pair log-probabilities; `split_into_passes` decides
which pairs of a step share a forward pass (a number of pairs for the padded layouts, a
token budget for the packed ones).

Rules:
- The prompt (formatted by `data.prompts.format_transcript`) and each reply are tokenized separately,
  so the prompt/reply boundary is exact in token space.
- The prompt gets BOS from the tokenizer's own special tokens, exactly once: chat
  templates often write the BOS text themselves, and a doubled BOS is a sequence the
  model never saw in training.
- A reply is tokenized without special tokens and ends with EOS (appended unless it is
  already there): the model must learn where its reply stops. With the "chat" format the
  reply's leading whitespace is stripped; with "hh" it is kept, so prompt + reply is
  the original transcript.
- `labels` equal `input_ids` on reply tokens (EOS included) and are -100 on prompt and
  padding; they are not shifted (the loss shifts them, as Hugging Face models do).
- Padding is on the right with the tokenizer's pad id (EOS when it has none; padding is
  masked by `attention_mask` and `labels`, so its id never matters).
- Truncation follows the original DPO reference implementation: when prompt + longer
  reply exceed `max_length`, the prompt is cut to `max_prompt_length` (by default keeping
  its end, the most recent turns, and its leading BOS); if that is still too long, both
  replies are cut to their first `max_length - max_prompt_length` tokens. A cut reply
  loses its EOS, as in the reference.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch

from twophase.data.base.errors import UserError
from twophase.data.hh_rlhf import PreferencePair
from twophase.data.prompts import DPO_FORMATS, DPO_OLD_NAMES, check_format, format_transcript
from twophase.data.tokens import encode_prompt
from twophase.data.packing import group_by_token_budget, pack_pairs, packed_length
from twophase.data.tokens import IGNORE_INDEX

TRUNCATION_SIDES = ("left", "right")
Layout = Literal["stacked", "shared_prompt", "packed", "packed_shared_prompt"]
LAYOUTS = get_args(Layout)
PACKED_LAYOUTS = ("packed", "packed_shared_prompt")


class TokenizedPair(NamedTuple):
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


class PreferenceCollator:
    """Callable that tokenizes, truncates and lays out a list of `PreferencePair`s.

    `truncation_side_prompt="left"` drops the start of a long prompt (keeps its end);
    "right" drops its end. The batch's keys depend on `layout` (see `collate_pairs`);
    every layout has `num_pairs` and `pair_tokens` (prompt twice, replies once).
    """

    def __init__(
        self,
        tokenizer,
        max_length: int = 1024,
        max_prompt_length: int = 512,
        prompt_format: str = "hh",
        truncation_side_prompt: str = "left",
        layout: str = "stacked",
    ):
        if not 0 < max_prompt_length < max_length:
            raise UserError(
                f"max_prompt_length ({max_prompt_length}) must be positive and smaller than "
                f"max_length ({max_length}) so that replies keep some tokens"
            )
        if truncation_side_prompt not in TRUNCATION_SIDES:
            raise UserError(
                f"unknown truncation_side_prompt '{truncation_side_prompt}'; use one of: {', '.join(TRUNCATION_SIDES)}"
            )
        check_layout(layout)
        prompt_format = DPO_OLD_NAMES.get(prompt_format, prompt_format)
        check_format(prompt_format, DPO_FORMATS, tokenizer)
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token, so replies cannot be ended; use the model's own tokenizer")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prompt_format = prompt_format
        self.keep_prompt_end = truncation_side_prompt == "left"
        self.layout = layout
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, pairs: list[PreferencePair]) -> dict:
        if not pairs:
            raise ValueError("PreferenceCollator got an empty batch")
        return collate_pairs([self.tokenize_pair(pair) for pair in pairs], self.layout, self.pad_id)

    def tokenize_pair(self, pair: PreferencePair) -> TokenizedPair:
        """Token ids of one pair's prompt and replies, truncated to fit `max_length`."""
        return truncate_pair(
            self.token_ids(pair), self.max_length, self.max_prompt_length, self.keep_prompt_end, self.tokenizer.bos_token_id
        )

    def token_ids(self, pair: PreferencePair) -> TokenizedPair:
        """Token ids of one pair's prompt (with BOS) and replies (with EOS), before truncation."""
        prompt = encode_prompt(self.tokenizer, format_transcript(pair.prompt, self.prompt_format, self.tokenizer))
        chosen = tokenize_response(self.tokenizer, self._response_text(pair.chosen))
        rejected = tokenize_response(self.tokenizer, self._response_text(pair.rejected))
        return TokenizedPair(prompt, chosen, rejected)

    def _response_text(self, response: str) -> str:
        # A chat template ends its generation prompt with its own separator; HH's leading
        # space belongs to the hh "Assistant: reply" layout only.
        return response.lstrip() if self.prompt_format == "chat" else response


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"unknown batch layout '{layout}'; use one of: {', '.join(LAYOUTS)}")


def truncate_pair(
    pair: TokenizedPair, max_length: int, max_prompt_length: int, keep_prompt_end: bool = True, bos_id: int | None = None
) -> TokenizedPair:
    """The pair cut to fit `max_length`, as the original DPO reference implementation cuts it.

    When prompt + longer reply exceed `max_length`, the prompt is cut to
    `max_prompt_length` (keeping its end, and its leading BOS, when `keep_prompt_end`);
    if that is still too long, both replies are cut to `max_length - max_prompt_length`.
    """
    prompt, chosen, rejected = pair
    longer_reply = max(len(chosen), len(rejected))
    if len(prompt) + longer_reply > max_length:
        prompt = _shorten_prompt(prompt, max_prompt_length, keep_prompt_end, bos_id)
    if len(prompt) + longer_reply > max_length:
        reply_budget = max_length - max_prompt_length
        chosen, rejected = chosen[:reply_budget], rejected[:reply_budget]
    return TokenizedPair(prompt, chosen, rejected)


def _shorten_prompt(prompt: list[int], keep: int, keep_end: bool, bos_id: int | None) -> list[int]:
    if len(prompt) <= keep:
        return prompt
    if not keep_end:
        return prompt[:keep]
    if bos_id is not None and prompt[0] == bos_id:
        # Keep BOS first: the model has only ever seen sequences that start with it.
        return [bos_id] + prompt[len(prompt) - (keep - 1) :]
    return prompt[len(prompt) - keep :]


def pair_tokens(pair: TokenizedPair) -> int:
    """The tokens a pair puts through the model as TRL counts them: the prompt twice, each reply once."""
    return packed_length(pair, share_prompt=False)


def collate_pairs(pairs: list[TokenizedPair], layout: str, pad_id: int) -> dict:
    """The batch of one forward pass over `pairs` in `layout` (see the module docstring)."""
    if layout == "stacked":
        return pad_stacked(pairs, pad_id)
    if layout == "shared_prompt":
        return pack_shared_prompt(pairs, pad_id)
    check_layout(layout)
    return pack_pairs(pairs, share_prompt=layout == "packed_shared_prompt")


def split_into_passes(pairs: list[TokenizedPair], layout: str, pairs_per_pass: int, tokens_per_pass: int) -> list[list[int]]:
    """Which of a step's pairs share a forward pass: consecutive groups of positions in `pairs`.

    Padded layouts take `pairs_per_pass` pairs at a time; packed layouts as many
    consecutive pairs as fit in `tokens_per_pass` tokens. The grouping never changes the
    step's loss (each pass contributes its share of the mean over the step's pairs).
    """
    if layout in PACKED_LAYOUTS:
        share_prompt = layout == "packed_shared_prompt"
        return group_by_token_budget([packed_length(pair, share_prompt) for pair in pairs], tokens_per_pass)
    return [list(range(start, min(start + pairs_per_pass, len(pairs)))) for start in range(0, len(pairs), pairs_per_pass)]


def pad_stacked(pairs: list[TokenizedPair], pad_id: int) -> dict:
    """(2B, T) rows, prompt + chosen then prompt + rejected, padded on the right.

    Returns `input_ids`, `attention_mask`, `labels` (2B, T), `num_pairs` and `pair_tokens`.
    """
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompt_lengths = [len(p.prompt) for p in pairs] * 2
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        ids_tensor = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids_tensor
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = ids_tensor[prompt_length:]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "num_pairs": len(pairs),
        "pair_tokens": sum(pair_tokens(p) for p in pairs),
    }


def tokenize_response(tokenizer, text: str) -> list[int]:
    """Reply ids without special tokens, ending with exactly one EOS."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


def pack_shared_prompt(pairs: list[TokenizedPair], pad_id: int) -> dict:
    """One row per pair, [prompt][chosen][rejected][padding], so the prompt is run once, not twice.

    A causal LM's states over the prompt are the same whichever reply follows,
    so chosen and rejected can share them. Inside the row:

    - positions restart after the prompt: chosen and rejected both start at P;
    - `allowed` (B, T, T) lets a token attend to earlier tokens of its own
      reply and to the prompt, never to the other reply (and never to padding);
    - `chosen_labels` / `rejected_labels` follow the usual unshifted convention
      (label at t + 1 is predicted by the state at t). The first rejected token
      is predicted by the last prompt token, so `rejected_labels[P]` holds it,
      although position P carries the first chosen token.

    With prompts of P tokens and replies of R, a pair costs P + 2R tokens
    instead of 2P + 2R.
    """
    width = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, −1 padding
    chosen_labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    rejected_labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, chosen, rejected) in enumerate(pairs):
        p, c, r = len(prompt), len(chosen), len(rejected)
        input_ids[row, : p + c + r] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
        position_ids[row, : p + c + r] = torch.tensor(list(range(p + c)) + list(range(p, p + r)), dtype=torch.long)
        segment[row, :p], segment[row, p : p + c], segment[row, p + c : p + c + r] = 0, 1, 2
        chosen_labels[row, p : p + c] = torch.tensor(chosen, dtype=torch.long)
        if r:
            rejected_labels[row, p] = rejected[0]  # predicted by the last prompt token
            rejected_labels[row, p + c + 1 : p + c + r] = torch.tensor(rejected[1:], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": (segment >= 0).long(),
        "position_ids": position_ids,
        "allowed": shared_prompt_attention(segment),
        "chosen_labels": chosen_labels,
        "rejected_labels": rejected_labels,
        "num_pairs": n,
        "pair_tokens": sum(pair_tokens(p) for p in pairs),
    }


def shared_prompt_attention(segment: torch.Tensor) -> torch.Tensor:
    """(B, T, T) boolean: may query q attend to key k? Causal, same reply or prompt, no padding."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    other_reply = (query == 2) & (key == 1)
    allowed = causal & (key >= 0) & ~other_reply
    return allowed | torch.eye(width, dtype=torch.bool)  # a padding row attends to itself: no empty softmax
