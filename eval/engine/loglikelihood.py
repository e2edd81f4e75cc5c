"""The log-likelihood engine every multiple-choice benchmark shares (generation: eval/engine/generation.py).

Benchmarks never call the model themselves. They describe what they need as
requests (`LoglikelihoodRequest`, or `GenerationRequest` for the generation
engine) and hand a list of them to an engine, which batches, runs and returns
the answers in request order. Because batching is the engines' job alone, the
property that matters can be tested once: batched results equal
one-at-a-time results.

How the engine batches:

* Rows are sorted by token length, longest first, and cut into batches of
  `batch_size` rows ("auto": as many as fit the memory free, at most 64;
  eval/engine/batching.py): rows of similar length waste little padding, and the longest
  batch runs first, so running out of memory happens at once, not after an hour.
* Padding is on the left, with position ids counted from each row's first real
  token. Every row then ends in the last column, so "the next token" and "the
  last m positions" are the same columns for the whole batch, and the model only
  projects those positions onto the vocabulary (`logits_to_keep`), which saves
  gigabytes of logits at a 100k vocabulary.

Tokenization rule, as lm-evaluation-harness (0.4.x) does it. A prompt or
log-likelihood context is tokenized with the tokenizer's special tokens (BOS),
unless its text already begins with the BOS token, as chat templates write it.
A continuation is not tokenized on its own: context + continuation is
tokenized as one text and the continuation is what follows the context's own
token count (`split_pair`). Whitespace that ends a context moves to the front
of the continuation first. Tokenized alone, " A" becomes two tokens
['▁', '▁A'] under a SentencePiece tokenizer (it prepends its own space) but
one token after "Answer:"; the joint split scores the tokens the model would
really read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.progress import progress
from twophase.data.base.model_api import causal_lm_of, forward_keywords
from twophase.data.tokens import encode_continuation, encode_prompt, left_pad, pad_id_of
from twophase.eval.engine.batching import AUTO, CPU_ROWS, check_batch_size, scoring_batches, scoring_budget


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str


# --------------------------------------------------------------------------- shared helpers


def start_token_id(tokenizer) -> int:
    """What an empty context conditions on: BOS, else EOS (lm-eval's prefix token)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError("an empty log-likelihood context needs a tokenizer with a BOS or EOS token")
    return int(start)


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), tokenized jointly and split at the context's length, as lm-eval does.

    The context's trailing whitespace moves to the continuation ("Answer: " +
    "A" is scored as "Answer:" + " A"). An empty context conditions on the
    start token alone; if the continuation itself begins with that token, the
    token becomes the context.
    """
    if not context:
        cont = encode_continuation(tokenizer, continuation)
        start = start_token_id(tokenizer)
        return ([start], cont) if not cont or cont[0] != start else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_prompt(tokenizer, context + continuation)
    context_ids = encode_prompt(tokenizer, context)
    return context_ids, whole[len(context_ids):]



def model_device(model) -> torch.device:
    return next(model.parameters()).device


class _ModelCaller:
    """Calls a Hugging Face causal LM across the keyword renames of transformers versions.

    transformers 5 calls the key/value cache `cache` (older: `past_key_values`);
    `logits_to_keep` is missing on some architectures, in which case all logits
    are computed and sliced afterwards.
    """

    def __init__(self, model):
        self.model = model
        self.cache_kw, keep_kw = forward_keywords(model)  # data/base/model_api.py
        self.has_logits_to_keep = keep_kw is not None

    def __call__(self, input_ids, attention_mask, position_ids, keep: int, cache=None):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=cache is not False)
        if cache not in (None, False):
            kwargs[self.cache_kw] = cache
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        logits = out.logits[:, -keep:, :]
        return logits, getattr(out, self.cache_kw, None)



def _merge_ranks(pieces: dict[int, list], stats: dict, before: dict) -> dict[int, list]:
    """Every rank's results by request index, and the engine's counters summed over ranks (one process: unchanged)."""
    if not distributed.active():
        return pieces
    mine = {key: stats[key] - before[key] for key in stats}
    merged: dict[int, list] = {}
    everyone = distributed.gather_objects((pieces, mine))
    for rank_pieces, _ in everyone:
        for i, values in rank_pieces.items():
            merged.setdefault(i, []).extend(values)
    for key in stats:
        stats[key] = before[key] + sum(delta[key] for _, delta in everyone)
    return merged


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest batch first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _hash_update(hasher, *texts: str) -> None:
    if hasher is not None:
        for text in texts:
            hasher.update(text.encode("utf-8"))
            hasher.update(b"\x00")


# --------------------------------------------------------------------------- log-likelihood


class LoglikelihoodEngine:
    """Summed log-probabilities of continuations given contexts, batched.

    Each request becomes a row `context + continuation[:-1]` whose last m
    positions predict the m continuation tokens. Requests with the same row
    share one forward pass: in particular all single-token choices of a
    multiple-choice question (" A", " B", " C", " D") are read from one forward
    of the question, since for them the row is the context alone.
    """

    def __init__(self, model, tokenizer, batch_size: int | str = AUTO, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = check_batch_size(batch_size)
        self.max_length = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.prompt_hasher = None  # set by the runner to hash everything the model is shown
        self.stats = {"requests": 0, "rows": 0, "forwards": 0, "tokens": 0, "seconds": 0.0}
        self.batch_rows: set[int] = set()  # the rows per batch used since the runner last cleared it
        self._call = _ModelCaller(model)

    # -- public API

    def loglikelihood(self, requests: list[LoglikelihoodRequest], desc: str = "loglikelihood") -> list[float]:
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # row -> [(request index, continuation ids)]
        results = [0.0] * len(requests)
        for i, req in enumerate(requests):
            _hash_update(self.prompt_hasher, req.context, req.continuation)
            context, cont = split_pair(self.tokenizer, req.context, req.continuation)
            if not cont:
                continue  # log p(empty) = 0
            row = tuple(context + cont[:-1])
            rows.setdefault(row, []).append((i, cont))
        self.stats["requests"] += len(requests)

        row_list = list(rows)
        keeps = [max(len(c) for _, c in rows[r]) for r in row_list]
        pieces: dict[int, list[float]] = {}
        stats_before = dict(self.stats)
        for batch, logprobs in self._batched_logprobs(row_list, keeps, desc):
            # Gather every scored token of the batch at once: one copy off the device.
            owners, b_idx, pos_idx, tok_idx = [], [], [], []
            width = logprobs.shape[1]
            for j, r in enumerate(batch):
                for i, cont in rows[row_list[r]]:
                    for t, token in enumerate(cont):
                        owners.append(i)
                        b_idx.append(j)
                        pos_idx.append(width - len(cont) + t)
                        tok_idx.append(token)
            values = logprobs[b_idx, pos_idx, tok_idx].double().tolist()
            for i, value in zip(owners, values):
                pieces.setdefault(i, []).append(value)
        pieces = _merge_ranks(pieces, self.stats, stats_before)
        for i, values in pieces.items():
            results[i] = math.fsum(values)
        return results

    def next_token_logprobs(self, prefixes: list[list[int]], desc: str = "next-token") -> list[torch.Tensor]:
        """The log-softmax over the vocabulary after each token-id prefix (float32, on CPU)."""
        out: list[torch.Tensor | None] = [None] * len(prefixes)
        stats_before = dict(self.stats)
        index: dict[tuple[int, ...], list[int]] = {}
        for i, prefix in enumerate(prefixes):
            index.setdefault(tuple(prefix), []).append(i)
        keys = list(index)
        for batch, logprobs in self._batched_logprobs(keys, [1] * len(keys), desc):
            last = logprobs[:, -1].cpu()
            for j, r in enumerate(batch):
                for i in index[keys[r]]:
                    out[i] = last[j]
        found = _merge_ranks({i: [t] for i, t in enumerate(out) if t is not None}, self.stats, stats_before)
        return [found[i][0] for i in range(len(prefixes))]

    # -- the batched forward

    @torch.inference_mode()
    def _batched_logprobs(self, rows: list[tuple[int, ...]], keeps: list[int], desc: str):
        """Yield (indices into rows, float32 log-softmax [batch, keep, vocab]) per batch.

        Rows are left-padded, so row i's last keeps[i] positions are the last
        columns of the batch's tensor.
        """
        device = model_device(self.model)
        pad = pad_id_of(self.tokenizer)
        # Under torchrun each rank computes every N-th batch (the same batches as one process: the same numbers).
        batches = distributed.shard_of(self._batches([len(r) for r in rows], keeps))
        for batch in progress(batches, desc=desc, leave=False, disable=len(batches) < 2):
            start = time.perf_counter()
            seqs = [self._truncate(list(rows[i]), keeps[i]) for i in batch]
            ids, mask, pos = left_pad(seqs, pad, device)
            logits, _ = self._call(ids, mask, pos, keep=max(keeps[i] for i in batch), cache=False)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            self.stats["forwards"] += 1
            self.stats["rows"] += len(batch)
            self.batch_rows.add(len(batch))
            self.stats["tokens"] += int(mask.sum())
            self.stats["seconds"] += time.perf_counter() - start
            yield batch, logprobs

    def _batches(self, lengths: list[int], keeps: list[int]) -> list[list[int]]:
        budget = scoring_budget(self.model) if self.batch_size == AUTO else None
        if budget is None:
            return length_sorted_batches(lengths, CPU_ROWS if self.batch_size == AUTO else self.batch_size)
        vocab = causal_lm_of(self.model).config.vocab_size
        return scoring_batches([min(n, self.max_length or n) for n in lengths], keeps, vocab, budget)

    def _truncate(self, row: list[int], keep: int) -> list[int]:
        # Too long for the model: drop the oldest context tokens, never the scored ones.
        if self.max_length and len(row) > self.max_length:
            if keep > self.max_length:
                raise UserError(f"a continuation of {keep} tokens does not fit the model's {self.max_length} positions")
            return row[len(row) - self.max_length:]
        return row
