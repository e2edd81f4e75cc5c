"""The one generation engine: every token twophase samples, for GRPO rollouts and for every benchmark.

`Generator.generate(prompts, …)` takes token-id prompts and returns one
`Completion` per prompt. Sampling, stopping and the cache are decided here and
nowhere else:

* **Batches.** Rows are cut into batches of at most `max_batch`, in the order
  given (callers sort by length). Identical prompts in a batch are prefilled
  once and their KV cache is copied to every row that continues them, so the G
  samples of a GRPO group (or the n samples of a benchmark question) share one
  prefill.
* **Choosing tokens.** Greedy, or temperature / top-k / top-p sampling with
  noise hashed from each row's own seed (eval/engine/sampling.py): reproducible, and
  independent of batching.
* **Stopping.** A row ends at an EOS token (kept in its tokens), at a stop
  string (the token that completes it is the last one kept), or at its
  `max_new_tokens`. The host reads the chosen tokens every `check_every` steps
  and checks only the new ones: EOS by id, stop strings by decoding the last
  few tokens, so the work per token does not grow with the completion.
  `generate(..., on_finished=f)` calls `f(i, completion)` the moment row i
  ends (GRPO starts checking a proof while the other rows generate).
* **Finished rows stop costing work.** When the rows still generating fit in a
  smaller power-of-two bucket, the decoder moves them to the front of the cache
  and continues with fewer slots; the batch ends when every row has finished.

`GenerationEngine` is the same engine seen by the benchmarks: text requests in,
text answers out (cut before the first stop string).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from twophase.data.base import distributed
from twophase.data.base.errors import UserError
from twophase.data.base.progress import progress
from twophase.data.tokens import encode_prompt
from twophase.eval.engine.batching import AUTO, MAX_GENERATION_ROWS, check_batch_size, rows_per_batch
from twophase.eval.engine.decoder import CacheDecoder, StaticDecoder, bucket, supports_static_decoding
from twophase.eval.engine.sampling import SamplingParams


@dataclass
class Completion:
    tokens: list[int]  # generated ids: EOS, or the token that completed a stop string, is the last one
    logprobs: list[float]  # log p(token) under the model at temperature 1, one per token
    finish: str  # "eos" | "stop" | "length"
    text: str = ""  # the tokens before EOS decoded, special tokens skipped (a stop string is included)


@dataclass
class _Row:
    """A row being generated, on the host."""

    max_new: int
    stop: tuple[str, ...]
    index: int = 0  # in the prompts given to `generate`
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None


class Generator:
    """Generates completions of token-id prompts with one model; reuse it (its CUDA graphs persist)."""

    def __init__(self, model, tokenizer, max_batch: int = 16, cuda_graphs: bool = True, check_every: int = 16,
                 stop_at_eos: bool = True, cache_storage: torch.Tensor | None = None):  # fmt: skip
        if max_batch < 1 or check_every < 1:
            raise UserError(f"generation batch size ({max_batch}) and check interval ({check_every}) must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.check_every = check_every
        self.stop_at_eos = stop_at_eos  # the speed benchmarks turn it off to force full lengths
        self.eos_ids = eos_ids_of(model, tokenizer)
        if supports_static_decoding(model):
            self.decoder = StaticDecoder(model, max_batch, cuda_graphs=cuda_graphs, storage=cache_storage)
        else:
            self.decoder = CacheDecoder(model, max_batch)
        self.stats = {"rows": 0, "prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        sampling: SamplingParams = SamplingParams(),
        seeds: list[int] | None = None,
        stop: tuple[str, ...] | list[tuple[str, ...]] = (),
        on_finished: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order. `max_new_tokens` and `stop` may be given per prompt."""
        n = len(prompts)
        if any(not p for p in prompts):
            raise UserError("cannot generate from an empty prompt (a tokenizer that adds no BOS and an empty text)")
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n
        if any(limit < 1 for limit in limits):
            raise UserError(f"max_new_tokens must be at least 1, got {min(limits)}")
        stops = stop if isinstance(stop, list) else [tuple(stop)] * n
        seeds = seeds if seeds is not None else [0] * n
        sampling.check()
        started = time.perf_counter()
        completions: list[Completion] = []
        for first in range(0, n, self.max_batch):
            batch = slice(first, first + self.max_batch)
            rows = [_Row(limit, tuple(s for s in stop_ if s), i) for i, limit, stop_ in zip(range(first, n), limits[batch], stops[batch])]
            self._run_batch(prompts[batch], rows, sampling, seeds[batch], on_finished)
            completions.extend(self._completion(row) for row in rows)
            self.stats["prompt_tokens"] += sum(len(p) for p in prompts[batch])
        self.stats["rows"] += n
        self.stats["generated_tokens"] += sum(len(c.tokens) for c in completions)
        self.stats["seconds"] += time.perf_counter() - started
        return completions

    # ------------------------------------------------------------------ one batch

    def _run_batch(self, prompts, rows: list[_Row], sampling: SamplingParams, seeds: list[int], on_finished=None) -> None:
        distinct, expand = _distinct(prompts)
        longest = max(row.max_new for row in rows)
        was_training = self.model.training
        self.model.eval()  # dropout off; the decoder's own cache replaces gradient checkpointing's cache-less path
        try:
            with torch.autocast(_device_type(self.model), enabled=False):  # compute in the weights' own dtype
                tokens, logprobs = self.decoder.start(distinct, expand, sampling, seeds, longest, self.check_every)
                slot_rows = list(range(len(rows)))  # which row each decoder slot is generating
                self._absorb(rows, slot_rows, [[t] for t in tokens], [[lp] for lp in logprobs], on_finished)
                while not all(row.finish for row in rows):
                    steps = min(self.check_every, max(row.max_new - len(row.tokens) for row in rows if not row.finish))
                    tokens, logprobs = self.decoder.run(steps, sampling)
                    self._absorb(rows, slot_rows, tokens, logprobs, on_finished)
                    slot_rows = self._drop_finished(rows, slot_rows)
        finally:
            self.model.train(was_training)

    def _absorb(self, rows, slot_rows, tokens, logprobs, on_finished=None) -> None:
        for slot, row in enumerate(rows[index] for index in slot_rows):
            for token, logprob in zip(tokens[slot], logprobs[slot]):
                if row.finish:
                    break
                row.tokens.append(token)
                row.logprobs.append(logprob)
                row.finish = self._finish_reason(row, token)
                if row.finish and on_finished:
                    on_finished(row.index, self._completion(row))

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if self.stop_at_eos and token in self.eos_ids:
            return "eos"
        if row.stop and self._completes_stop(row):
            return "stop"
        if len(row.tokens) >= row.max_new:
            return "length"
        return None

    def _completes_stop(self, row: _Row) -> bool:
        # A stop string of L characters ends within the last L tokens (a token decodes to at least
        # one character); a few more cover tokens that hold only part of a multi-byte character.
        window = max(len(s) for s in row.stop) + 4
        tail = self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in row.stop)

    def _drop_finished(self, rows, slot_rows) -> list[int]:
        active = [slot for slot, r in enumerate(slot_rows) if not rows[r].finish]
        if active and bucket(len(active), self.max_batch) < bucket(len(slot_rows), self.max_batch):
            self.decoder.keep(active)
            return [slot_rows[slot] for slot in active]
        return slot_rows

    def _completion(self, row: _Row) -> Completion:
        reply = row.tokens[:-1] if row.finish == "eos" else row.tokens  # the text never shows the EOS token
        text = self.tokenizer.decode(reply, skip_special_tokens=True)
        return Completion(row.tokens, row.logprobs, row.finish or "length", text)


def _distinct(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in first-seen order, and for each row the index of its prompt among them."""
    index: dict[tuple[int, ...], int] = {}
    expand = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], expand


def _device_type(model) -> str:
    return next(model.parameters()).device.type


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, (list, tuple)):
        ids.update(int(e) for e in config_eos)
    return ids


def seed_for(*parts) -> int:
    """A 63-bit sampling seed from any parts (seed, prompt, sample number, step, …)."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- the benchmarks' view


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # already formatted (chat template applied, or raw text)
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    at = first_stop(text, stops)
    return text if at is None else text[:at]


class GenerationEngine:
    """Text requests in, n answers per request out, each cut before its first stop string.

    A greedy answer is generated once and copied n times. A sampled answer k of
    a prompt is seeded by (seed, prompt, k), so it does not change with batch
    size, request order or --limit, and a rerun reproduces it.

    `batch_size` "auto" picks the rows of each batch from the memory free for
    the KV cache of its prompts and answers (eval/engine/batching.py).
    """

    def __init__(self, model, tokenizer, batch_size: int | str = AUTO, seed: int = 0, stop_at_eos: bool = True):
        self.batch_size = check_batch_size(batch_size)
        most = MAX_GENERATION_ROWS if self.batch_size == AUTO else self.batch_size
        self.generator = Generator(model, tokenizer, max_batch=most, stop_at_eos=stop_at_eos)
        self.tokenizer = tokenizer
        self.seed = seed
        self.batch_rows: set[int] = set()  # the rows per batch used since the runner last cleared it
        self.prompt_hasher = None  # set by the runner to hash everything the model is shown
        self.stats = {"requests": 0, "rows": 0, "prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}

    @property
    def eos_ids(self) -> set[int]:
        return self.generator.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self.generator.eos_ids = set(ids)

    def generate(self, requests: list[GenerationRequest], desc: str = "generate") -> list[list[str]]:
        before = dict(self.generator.stats)
        rows = self._rows(requests)
        answers = [[""] * req.n for req in requests]
        groups: dict[SamplingParams, list] = {}
        for row in rows:
            groups.setdefault(row["sampling"], []).append(row)
        texts: dict[tuple[int, int], str] = {}  # (request, copy) -> answer, of the chunks this rank computed
        for sampling, group in groups.items():
            # Longest prompts first (memory errors come at once), a prompt's samples side by side (one prefill).
            group.sort(key=lambda r: (-len(r["ids"]), r["request"], r["sample"]))
            batch = rows_per_batch(self.batch_size, self.generator, group)  # eval/engine/batching.py
            self.batch_rows.add(batch)
            # Under torchrun each rank decodes every N-th chunk: the same chunks, so the same answers, as one process.
            starts = distributed.shard_of(list(range(0, len(group), batch)))
            for first in progress(starts, desc=desc, leave=False, disable=len(group) <= batch):
                chunk = group[first : first + batch]
                done = self.generator.generate(
                    [r["ids"] for r in chunk], [r["max_new"] for r in chunk], sampling,
                    [r["seed"] for r in chunk], [r["stop"] for r in chunk],
                )  # fmt: skip
                for row, completion in zip(chunk, done):
                    for copy in row["copies"]:
                        texts[row["request"], copy] = cut_at_stop(completion.text, row["stop"])
        generated = {key: self.generator.stats[key] - before[key] for key in ("prompt_tokens", "generated_tokens", "seconds")}
        for rank_texts, rank_generated in distributed.gather_objects((texts, generated)):
            for (request, copy), text in rank_texts.items():
                answers[request][copy] = text
            for key, value in rank_generated.items():
                self.stats[key] += value
        self.stats["requests"] += len(requests)
        self.stats["rows"] += len(rows)
        return answers

    def _rows(self, requests: list[GenerationRequest]) -> list[dict]:
        """One row per answer to compute; a greedy request is computed once for all its n answers."""
        rows = []
        for i, req in enumerate(requests):
            if self.prompt_hasher is not None:
                self.prompt_hasher.update(req.prompt.encode("utf-8") + b"\x00")
            ids = encode_prompt(self.tokenizer, req.prompt)
            sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p if req.temperature > 0 else 1.0)
            samples = 1 if sampling.greedy else req.n
            for sample in range(samples):
                rows.append({
                    "request": i, "sample": sample, "ids": ids, "max_new": req.max_new_tokens,
                    "stop": tuple(req.stop), "sampling": sampling, "seed": seed_for(self.seed, sample, req.prompt),
                    "copies": list(range(req.n)) if sampling.greedy else [sample],
                })  # fmt: skip
        return rows
