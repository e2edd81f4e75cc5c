"""Sampling completions from the policy and laying them out for training.

A rollout is G completions for each of a few prompts, stored as one padded
batch in the layout the generator produces:

    [left padding][prompt tokens][completion tokens][right padding]

`labels` hold the completion tokens (up to and including EOS, or the stop
string's last token) and −100 elsewhere, so the log-probability code of
Phase 1 serves Phase 2 unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from data.collators import tokenize_prompt
from losses.logprobs import IGNORE_INDEX


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    labels: torch.Tensor  # (N, T), completion tokens only
    completions: list[str]  # decoded completion texts, N of them
    completion_lengths: list[int]
    truncated: list[bool]  # hit max_new_tokens without EOS or a stop string
    generation_seconds: float

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Rollout":
        for name in ("input_ids", "attention_mask", "labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_strings: tuple[str, ...] = (),
    batch_size: int = 16,
    max_prompt_length: int = 512,
    static_cache: bool = False,
) -> Rollout:
    """G = `num_generations` sampled completions of each prompt, prompt-major: [p0 × G, p1 × G, …].

    With `static_cache`, generation uses a preallocated KV cache, which lets
    transformers compile the decoding step into CUDA graphs: far less Python
    overhead per token. Every batch is then padded to the same shape
    (`batch_size` rows × `max_prompt_length` columns) so the graphs are
    captured once and reused at every step.
    """
    started = time.perf_counter()
    prompt_ids = [_keep_end(tokenize_prompt(tokenizer, text), max_prompt_length, tokenizer.bos_token_id) for text in prompts]
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    was_training = model.training
    model.eval()  # gradient checkpointing turns the KV cache off in training mode
    try:
        shape = (batch_size, max_prompt_length) if static_cache else None
        pieces = [
            _generate(model, tokenizer, repeated[i : i + batch_size], max_new_tokens, temperature, top_p, stop_strings, shape)
            for i in range(0, len(repeated), batch_size)
        ]
    finally:
        model.train(was_training)
    sequences = [seq for piece in pieces for seq in piece]
    return _layout(tokenizer, repeated, sequences, max_new_tokens, stop_strings, time.perf_counter() - started)


def _keep_end(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The last `limit` prompt tokens (the statement is at the end), still starting with BOS if it did."""
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return [bos_id] + ids[len(ids) - limit + 1 :]
    return ids[len(ids) - limit :]


def _generate(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, stop_strings, shape=None) -> list[list[int]]:
    """Generate for one batch; returns each row's completion ids (EOS included, padding removed).

    `shape` = (rows, width) pads the batch to a fixed shape (static cache); extra rows are dropped.
    """
    device = next(model.parameters()).device
    real_rows = len(prompt_ids)
    width = max(len(ids) for ids in prompt_ids)
    if shape is not None:
        prompt_ids = prompt_ids + [prompt_ids[-1]] * (shape[0] - real_rows)
        width = max(width, shape[1])
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends at the same column
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad, use_cache=True)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    if shape is not None:
        kwargs.update(cache_implementation="static")
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    return [_completion_ids(row[width:].tolist(), tokenizer, stop_strings) for row in output[:real_rows].cpu()]


def _completion_ids(generated: list[int], tokenizer, stop_strings) -> list[int]:
    """A generated row up to its first EOS or the end of its first stop string, whichever comes first.

    The stop string is looked for before EOS because rows that stopped early are
    padded, and a tokenizer whose pad token is EOS would make that padding look
    like a generated EOS.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    end = generated.index(eos) + 1 if eos in generated else len(generated)
    stop_end = _stop_string_end(generated[:end], tokenizer, stop_strings)
    if stop_end is not None:
        return generated[:stop_end]
    completion = generated[:end]
    while completion and completion[-1] == pad and pad != eos:
        completion = completion[:-1]
    return completion


def _stop_string_end(ids: list[int], tokenizer, stop_strings) -> int | None:
    """Length of the shortest prefix of `ids` whose text contains a stop string, or None."""
    if not stop_strings or not any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop_strings):
        return None
    for end in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:end], skip_special_tokens=True) for s in stop_strings):
            return end
    return None


def _layout(tokenizer, prompt_ids, completion_ids, max_new_tokens, stop_strings, seconds) -> Rollout:
    prompt_width = max(len(ids) for ids in prompt_ids)
    width = prompt_width + max(1, max(len(c) for c in completion_ids))
    n = len(prompt_ids)
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    texts, truncated = [], []
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        start = prompt_width - len(prompt)
        end = prompt_width + len(completion)
        input_ids[row, start:prompt_width] = torch.tensor(prompt)
        input_ids[row, prompt_width:end] = torch.tensor(completion, dtype=torch.long)
        attention_mask[row, start:end] = 1
        labels[row, prompt_width:end] = input_ids[row, prompt_width:end]
        text = tokenizer.decode(completion, skip_special_tokens=True)
        texts.append(text)
        finished = completion[-1:] == [tokenizer.eos_token_id] or any(s in text for s in stop_strings)
        truncated.append(len(completion) >= max_new_tokens and not finished)
    return Rollout(input_ids, attention_mask, labels, texts, [len(c) for c in completion_ids], truncated, seconds)
