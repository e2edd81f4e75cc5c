"""Turn preference pairs into one padded batch for a single forward pass.

`PreferenceCollator(tokenizer)(pairs)` returns tensors of shape (2B, T): rows 0..B-1
are prompt + chosen reply, rows B..2B-1 are prompt + rejected reply, so the policy
(and the reference model) score both halves of every pair in one call.

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

from typing import NamedTuple

import torch

from data.errors import UserError
from data.hh_rlhf import PreferencePair
from data.prompts import DPO_FORMATS, DPO_OLD_NAMES, check_format, format_transcript
from data.tokens import encode_prompt

IGNORE_INDEX = -100  # label value that cross-entropy skips
TRUNCATION_SIDES = ("left", "right")


class TokenizedPair(NamedTuple):
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


class PreferenceCollator:
    """Callable that tokenizes, truncates and pads a list of `PreferencePair`s.

    `truncation_side_prompt="left"` drops the start of a long prompt (keeps its end);
    "right" drops its end. Returns `input_ids`, `attention_mask`, `labels` (2B, T),
    `prompt_lengths` (B,) and `num_pairs` (B).
    """

    def __init__(
        self,
        tokenizer,
        max_length: int = 1024,
        max_prompt_length: int = 512,
        prompt_format: str = "hh",
        truncation_side_prompt: str = "left",
        share_prompt: bool = False,
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
        prompt_format = DPO_OLD_NAMES.get(prompt_format, prompt_format)
        check_format(prompt_format, DPO_FORMATS, tokenizer)
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token, so replies cannot be ended; use the model's own tokenizer")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prompt_format = prompt_format
        self.keep_prompt_end = truncation_side_prompt == "left"
        self.share_prompt = share_prompt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, pairs: list[PreferencePair]) -> dict:
        if not pairs:
            raise ValueError("PreferenceCollator got an empty batch")
        tokenized = [self.tokenize_pair(pair) for pair in pairs]
        if self.share_prompt:
            return pack_shared_prompt(tokenized, self.pad_id)
        prompts = [t.prompt for t in tokenized]
        sequences = [t.prompt + t.chosen for t in tokenized] + [t.prompt + t.rejected for t in tokenized]
        prompt_lengths = [len(p) for p in prompts] * 2
        batch = self._pad(sequences, prompt_lengths)
        batch["prompt_lengths"] = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        batch["num_pairs"] = len(pairs)
        return batch

    def tokenize_pair(self, pair: PreferencePair) -> TokenizedPair:
        """Token ids of one pair's prompt and replies, truncated to fit `max_length`."""
        prompt = encode_prompt(self.tokenizer, format_transcript(pair.prompt, self.prompt_format, self.tokenizer))
        chosen = tokenize_response(self.tokenizer, self._response_text(pair.chosen))
        rejected = tokenize_response(self.tokenizer, self._response_text(pair.rejected))
        return self._truncate(TokenizedPair(prompt, chosen, rejected))

    def _response_text(self, response: str) -> str:
        # A chat template ends its generation prompt with its own separator; HH's leading
        # space belongs to the hh "Assistant: reply" layout only.
        return response.lstrip() if self.prompt_format == "chat" else response

    def _truncate(self, pair: TokenizedPair) -> TokenizedPair:
        prompt, chosen, rejected = pair
        longer_reply = max(len(chosen), len(rejected))
        if len(prompt) + longer_reply > self.max_length:
            prompt = self._shorten_prompt(prompt)
        if len(prompt) + longer_reply > self.max_length:
            reply_budget = self.max_length - self.max_prompt_length
            chosen, rejected = chosen[:reply_budget], rejected[:reply_budget]
        return TokenizedPair(prompt, chosen, rejected)

    def _shorten_prompt(self, prompt: list[int]) -> list[int]:
        keep = self.max_prompt_length
        if len(prompt) <= keep:
            return prompt
        if not self.keep_prompt_end:
            return prompt[:keep]
        bos_id = self.tokenizer.bos_token_id
        if bos_id is not None and prompt[0] == bos_id:
            # Keep BOS first: the model has only ever seen sequences that start with it.
            return [bos_id] + prompt[len(prompt) - (keep - 1) :]
        return prompt[len(prompt) - keep :]

    def _pad(self, sequences: list[list[int]], prompt_lengths: list[int]) -> dict:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
            ids_tensor = torch.tensor(ids, dtype=torch.long)
            input_ids[row, : len(ids)] = ids_tensor
            attention_mask[row, : len(ids)] = 1
            labels[row, prompt_length : len(ids)] = ids_tensor[prompt_length:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
        "pair_tokens": sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs),
    }


def shared_prompt_attention(segment: torch.Tensor) -> torch.Tensor:
    """(B, T, T) boolean: may query q attend to key k? Causal, same reply or prompt, no padding."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    other_reply = (query == 2) & (key == 1)
    allowed = causal & (key >= 0) & ~other_reply
    return allowed | torch.eye(width, dtype=torch.bool)  # a padding row attends to itself: no empty softmax
