"""Sampling completions from the policy and laying them out for training.

The sampling itself is the generation engine's (eval/engine/generation.py), the same
one every benchmark uses. A rollout is G completions for each of a few
prompts, stored as one padded batch:

    [left padding][prompt tokens][completion tokens][right padding]

`labels` hold the completion tokens (up to and including EOS, or the token
that completed a stop string) and −100 elsewhere, so the log-probability code
of Phase 1 serves Phase 2 unchanged. `sampler_logprobs` keep what the sampler
computed for each completion token, aligned with the training forward's
(B, T − 1) log-probabilities, so the two can be compared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from twophase.data.tokens import encode_prompt, keep_end, pad_id_of
from twophase.eval.engine.generation import Completion, Generator, seed_for
from twophase.eval.engine.sampling import SamplingParams
from twophase.losses.logprobs import IGNORE_INDEX


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T), completion tokens only
    sampler_logprobs: torch.Tensor  # (N, T − 1): log p of labels[:, t + 1] as the sampler computed it, 0 elsewhere
    completions: list[str]  # decoded completion texts, N of them
    completion_lengths: list[int]
    truncated: list[bool]  # hit max_new_tokens without EOS or a stop string
    generation_seconds: float

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def rollout_seeds(seed: int, generation_step: int, rows: int) -> list[int]:
    """One sampling seed per completion: a function of (run seed, generation step, row), so resume repeats it."""
    return [seed_for("rollout", seed, generation_step, row) for row in range(rows)]


def sample_completions(
    generator: Generator,
    prompts: list[str],
    num_generations: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    seeds: list[int],
    stop_strings: tuple[str, ...] = (),
    max_prompt_length: int = 512,
) -> Rollout:
    """G = `num_generations` completions of each prompt, prompt-major: [p0 × G, p1 × G, …].

    The G rows of a prompt share one prefill (the engine prefills each distinct prompt once).
    """
    started = time.perf_counter()
    tokenizer = generator.tokenizer
    prompt_ids = [keep_end(encode_prompt(tokenizer, text), max_prompt_length, tokenizer.bos_token_id) for text in prompts]
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    completions = generator.generate(repeated, max_new_tokens, sampling, seeds, stop_strings)
    return layout(repeated, completions, pad_id_of(tokenizer), time.perf_counter() - started)


def layout(prompt_ids: list[list[int]], completions: list[Completion], pad_id: int, seconds: float) -> Rollout:
    """Prompts left-padded to one column, completions after it, right padding after them."""
    prompt_width = max(len(ids) for ids in prompt_ids)
    width = prompt_width + max(1, max(len(c.tokens) for c in completions))
    n = len(prompt_ids)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    sampler_logprobs = torch.zeros((n, width - 1), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completions)):
        start, end = prompt_width - len(prompt), prompt_width + len(completion.tokens)
        input_ids[row, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, prompt_width:end] = torch.tensor(completion.tokens, dtype=torch.long)
        attention_mask[row, start:end] = 1
        labels[row, prompt_width:end] = input_ids[row, prompt_width:end]
        # the token at column t is predicted at column t − 1
        sampler_logprobs[row, prompt_width - 1 : end - 1] = torch.tensor(completion.logprobs, dtype=torch.float32)
    return Rollout(
        input_ids, attention_mask, labels, sampler_logprobs,
        completions=[c.text for c in completions],
        completion_lengths=[len(c.tokens) for c in completions],
        truncated=[c.finish == "length" for c in completions],
        generation_seconds=seconds,
    )  # fmt: skip


@dataclass
class RolloutSlice:
    """One micro-batch of the update: some rows of a rollout with everything the loss needs, on the device.

    Columns that are padding in every row are dropped (`trim`): a micro-batch of
    short completions should not pay for the longest one. The stored (N, T − 1)
    log-probabilities are cut to the same columns.
    """

    input_ids: torch.Tensor  # (n, t)
    attention_mask: torch.Tensor  # (n, t)
    labels: torch.Tensor  # (n, t)
    advantages: torch.Tensor  # (n,)
    old_logps: torch.Tensor | None  # (n, t − 1): the sampling policy's, for μ > 1; None: the current policy's, detached
    ref_logps: torch.Tensor | None  # (n, t − 1): the reference model's, for β > 0
    sampler_logprobs: torch.Tensor | None  # (n, t − 1): the sampler's own, to compare with before any update
    row_share: float  # n / the rows of the whole (global) generation batch


def rollout_slice(
    rollout: Rollout, rows: slice, device: torch.device, global_rows: int, advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
    trim: bool = True, compare_sampler: bool = False,
) -> RolloutSlice:  # fmt: skip
    """Rows `rows` of `rollout` (and of the per-row tensors that go with it) as a micro-batch."""
    ids, mask, labels = rollout.input_ids[rows], rollout.attention_mask[rows], rollout.labels[rows]
    columns = slice(0, ids.shape[1])
    if trim:
        used = mask.any(0).nonzero().flatten()
        columns = slice(int(used[0]), int(used[-1]) + 1)
    stored = slice(columns.start, columns.stop - 1)  # position t of the (t − 1)-wide log-probs is column start + t

    def on_device(table: torch.Tensor | None) -> torch.Tensor | None:
        return None if table is None else table[rows, stored].to(device)

    return RolloutSlice(
        input_ids=ids[:, columns].to(device), attention_mask=mask[:, columns].to(device),
        labels=labels[:, columns].to(device), advantages=advantages[rows].to(device),
        old_logps=on_device(old_logps), ref_logps=on_device(ref_logps),
        sampler_logprobs=on_device(rollout.sampler_logprobs) if compare_sampler else None,
        row_share=(rows.stop - rows.start) / global_rows,
    )  # fmt: skip
