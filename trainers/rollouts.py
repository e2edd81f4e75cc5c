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

One `RolloutBatch` holds all a rollout is to the update: the tokens and masks,
then the advantages and the old and reference log-probabilities as the
recipe computes them; `micro_batch` cuts rows of it for one forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from twophase.data.tokens import encode_prompt, keep_end, pad_id_of
from twophase.eval.engine.generation import Completion, Generator, seed_for
from twophase.eval.engine.sampling import SamplingParams
from twophase.losses.logprobs import IGNORE_INDEX


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T), completion tokens only
    sampler_logprobs: torch.Tensor | None  # (N, T − 1): log p of labels[:, t + 1] as the sampler computed it, 0 elsewhere
    completions: list[str] = field(default_factory=list)  # decoded completion texts, N of them
    completion_lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)  # hit max_new_tokens without EOS or a stop string
    generation_seconds: float = 0.0
    advantages: torch.Tensor | None = None  # (N,)
    old_logps: torch.Tensor | None = None  # (N, T − 1): the sampling policy's, for μ > 1; None: the current policy's, detached
    ref_logps: torch.Tensor | None = None  # (N, T − 1): the reference model's, for β > 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def micro_batch(self, rows: slice, device: torch.device, trim: bool = True, with_sampler: bool = False) -> RolloutBatch:
        """Rows `rows` with everything the loss needs, on `device` (texts left behind).

        Columns that are padding in every row are dropped (`trim`): a micro-batch of
        short completions should not pay for the longest one. The stored (N, T − 1)
        log-probabilities are cut to the same columns.
        """
        ids, mask, labels = self.input_ids[rows], self.attention_mask[rows], self.labels[rows]
        columns = slice(0, ids.shape[1])
        if trim:
            used = mask.any(0).nonzero().flatten()
            columns = slice(int(used[0]), int(used[-1]) + 1)
        stored = slice(columns.start, columns.stop - 1)  # position t of the (t − 1)-wide log-probs is column start + t

        def on_device(table: torch.Tensor | None) -> torch.Tensor | None:
            return None if table is None else table[rows, stored].to(device)

        return RolloutBatch(
            ids[:, columns].to(device), mask[:, columns].to(device), labels[:, columns].to(device),
            sampler_logprobs=on_device(self.sampler_logprobs) if with_sampler else None,
            advantages=None if self.advantages is None else self.advantages[rows].to(device),
            old_logps=on_device(self.old_logps), ref_logps=on_device(self.ref_logps),
        )  # fmt: skip


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
    on_finished=None,
) -> RolloutBatch:
    """G = `num_generations` completions of each prompt, prompt-major: [p0 × G, p1 × G, …].

    The G rows of a prompt share one prefill; `on_finished(row, completion)` runs the moment a row ends.
    """
    started = time.perf_counter()
    tokenizer = generator.tokenizer
    prompt_ids = [keep_end(encode_prompt(tokenizer, text), max_prompt_length, tokenizer.bos_token_id) for text in prompts]
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    completions = generator.generate(repeated, max_new_tokens, sampling, seeds, stop_strings, on_finished)
    return padded_rollout(repeated, completions, pad_id_of(tokenizer), time.perf_counter() - started)


def padded_rollout(prompt_ids: list[list[int]], completions: list[Completion], pad_id: int, seconds: float) -> RolloutBatch:
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
    return RolloutBatch(
        input_ids, attention_mask, labels, sampler_logprobs,
        completions=[c.text for c in completions],
        completion_lengths=[len(c.tokens) for c in completions],
        truncated=[c.finish == "length" for c in completions],
        generation_seconds=seconds,
    )  # fmt: skip
