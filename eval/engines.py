"""The two engines every benchmark shares: batched generation and batched log-likelihood.

Benchmarks never call the model themselves. They describe what they need as
requests (`GenerationRequest`, `LoglikelihoodRequest`) and hand a list of them
to an engine, which batches, runs and returns the answers in request order.
Because batching is the engines' job alone, the property that matters can be
tested once: batched results equal one-at-a-time results.

How both engines batch:

* Rows are sorted by token length, longest first, and cut into batches of
  `batch_size`: rows of similar length waste little padding, and the longest
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

import hashlib
import inspect
import math
import time
from dataclasses import dataclass

import torch

from data.errors import UserError

try:  # tqdm ships with transformers; progress bars are a convenience only
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable=None, **_):
        return iterable


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # already formatted (chat template applied, or raw text)
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str
    continuation: str


# --------------------------------------------------------------------------- shared helpers


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: with BOS, unless the text already starts with it."""
    bos = tokenizer.bos_token
    already_has_bos = bool(bos) and text.startswith(bos)
    return list(tokenizer(text, add_special_tokens=not already_has_bos)["input_ids"])


def encode_continuation(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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


def pad_id_of(tokenizer) -> int:
    """The pad id; EOS when the tokenizer has none (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


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
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.has_logits_to_keep = "logits_to_keep" in params

    def __call__(self, input_ids, attention_mask, position_ids, keep: int, cache=None):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=cache is not False)
        if cache not in (None, False):
            kwargs[self.cache_kw] = cache
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        logits = out.logits[:, -keep:, :]
        return logits, getattr(out, self.cache_kw, None)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of left-padded rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    # Positions count real tokens only, so a padded row sees the same positions as alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


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

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.prompt_hasher = None  # set by the runner to hash everything the model is shown
        self.stats = {"requests": 0, "rows": 0, "forwards": 0, "tokens": 0, "seconds": 0.0}
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
        for i, values in pieces.items():
            results[i] = math.fsum(values)
        return results

    def next_token_logprobs(self, prefixes: list[list[int]], desc: str = "next-token") -> list[torch.Tensor]:
        """The log-softmax over the vocabulary after each token-id prefix (float32, on CPU)."""
        out: list[torch.Tensor | None] = [None] * len(prefixes)
        index: dict[tuple[int, ...], list[int]] = {}
        for i, prefix in enumerate(prefixes):
            index.setdefault(tuple(prefix), []).append(i)
        keys = list(index)
        for batch, logprobs in self._batched_logprobs(keys, [1] * len(keys), desc):
            last = logprobs[:, -1].cpu()
            for j, r in enumerate(batch):
                for i in index[keys[r]]:
                    out[i] = last[j]
        return out

    # -- the batched forward

    @torch.inference_mode()
    def _batched_logprobs(self, rows: list[tuple[int, ...]], keeps: list[int], desc: str):
        """Yield (indices into rows, float32 log-softmax [batch, keep, vocab]) per batch.

        Rows are left-padded, so row i's last keeps[i] positions are the last
        columns of the batch's tensor.
        """
        device = model_device(self.model)
        pad = pad_id_of(self.tokenizer)
        batches = length_sorted_batches([len(r) for r in rows], self.batch_size)
        for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2):
            start = time.perf_counter()
            seqs = [self._truncate(list(rows[i]), keeps[i]) for i in batch]
            ids, mask, pos = left_pad(seqs, pad, device)
            logits, _ = self._call(ids, mask, pos, keep=max(keeps[i] for i in batch), cache=False)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            self.stats["forwards"] += 1
            self.stats["rows"] += len(batch)
            self.stats["tokens"] += int(mask.sum())
            self.stats["seconds"] += time.perf_counter() - start
            yield batch, logprobs

    def _truncate(self, row: list[int], keep: int) -> list[int]:
        # Too long for the model: drop the oldest context tokens, never the scored ones.
        if self.max_length and len(row) > self.max_length:
            if keep > self.max_length:
                raise UserError(f"a continuation of {keep} tokens does not fit the model's {self.max_length} positions")
            return row[len(row) - self.max_length:]
        return row


# --------------------------------------------------------------------------- generation


def row_seed(seed: int, prompt: str, sample: int) -> int:
    """A sampling seed that depends on the prompt and sample number only.

    So a sampled answer does not change with batch size, request order or
    --limit, and a rerun reproduces it.
    """
    digest = hashlib.sha256(f"{seed}\x00{sample}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    at = first_stop(text, stops)
    return text if at is None else text[:at]


@dataclass
class _Row:
    request: int
    sample: int
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    generator: torch.Generator | None
    out: list[int]
    done: bool = False


class GenerationEngine:
    """Batched generation with a hand-written decoding loop over the model's KV cache.

    Greedy when a request's temperature is 0; otherwise temperature / top-p
    sampling with one random generator per answer, seeded from (seed, prompt,
    sample number). A row stops at EOS (not included), at `max_new_tokens`, or
    when its text contains a stop string; the returned text is cut before the
    first stop string. Finished rows are dropped from the batch as it goes.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, seed: int = 0, stop_at_eos: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.stop_at_eos = stop_at_eos  # the speed benchmark turns it off to force full lengths
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.prompt_hasher = None
        self.stats = {"requests": 0, "rows": 0, "prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}
        self._call = _ModelCaller(model)

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids = set()
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(config_eos, int):
            ids.add(config_eos)
        elif isinstance(config_eos, (list, tuple)):
            ids.update(int(e) for e in config_eos)
        return ids

    def generate(self, requests: list[GenerationRequest], desc: str = "generate") -> list[list[str]]:
        """n completions per request, in request order, each cut before its first stop string."""
        device = model_device(self.model)
        rows, copies = self._expand(requests, device)
        self.stats["requests"] += len(requests)
        self.stats["rows"] += len(rows)
        batches = length_sorted_batches([len(r.ids) for r in rows], self.batch_size)
        for batch in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2):
            start = time.perf_counter()
            self._run_batch([rows[i] for i in batch], device)
            self.stats["seconds"] += time.perf_counter() - start

        texts = [[""] * req.n for req in requests]
        for row in rows:
            text = cut_at_stop(self.tokenizer.decode(row.out, skip_special_tokens=True), row.stop)
            for sample in copies[(row.request, row.sample)]:
                texts[row.request][sample] = text
        return texts

    def _expand(self, requests, device):
        """One row per answer to compute; greedy answers are computed once and copied n times."""
        rows, copies = [], {}
        for i, req in enumerate(requests):
            _hash_update(self.prompt_hasher, req.prompt)
            ids = encode_prompt(self.tokenizer, req.prompt)
            if not ids:
                raise UserError("cannot generate from an empty prompt with a tokenizer that adds no BOS token")
            greedy = req.temperature <= 0
            for sample in range(1 if greedy else req.n):
                generator = None
                if not greedy:
                    generator = torch.Generator(device=device)
                    generator.manual_seed(row_seed(self.seed, req.prompt, sample))
                rows.append(_Row(i, sample, ids, req.max_new_tokens, req.temperature, req.top_p, tuple(req.stop), generator, []))
                copies[(i, sample)] = list(range(req.n)) if greedy else [sample]
        return rows, copies

    @torch.inference_mode()
    def _run_batch(self, rows: list[_Row], device) -> None:
        ids, mask, positions = left_pad([r.ids for r in rows], pad_id_of(self.tokenizer), device)
        self.stats["prompt_tokens"] += int(mask.sum())
        active = list(range(len(rows)))  # batch position -> index into rows
        logits, cache = self._call(ids, mask, positions, keep=1)
        next_pos = positions[:, -1] + 1
        longest = max(r.max_new for r in rows)
        for _ in range(longest):
            tokens = self._pick([rows[a] for a in active], logits[:, -1, :])
            for a, token in zip(active, tokens.tolist()):  # one device-to-host copy per step
                self._append(rows[a], token)
            keep = [b for b, a in enumerate(active) if not rows[a].done]
            if not keep:
                break
            if len(keep) <= 0.75 * len(active) and hasattr(cache, "batch_select_indices"):
                # Enough rows finished: drop them so the rest of the batch runs narrower.
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                tokens, mask, next_pos = tokens[index], mask[index], next_pos[index]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits, cache = self._call(tokens.view(-1, 1), mask, next_pos.view(-1, 1), keep=1, cache=cache)
            next_pos = next_pos + 1

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row: argmax, or a sample from its own generator."""
        tokens = logits.argmax(dim=-1)
        for b, row in enumerate(rows):
            if row.generator is None or row.done:
                continue
            probs = torch.softmax(logits[b].float() / row.temperature, dim=-1)
            if row.top_p < 1.0:
                probs = _top_p_filter(probs, row.top_p)
            tokens[b] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return tokens

    def _append(self, row: _Row, token: int) -> None:
        if row.done:
            return
        if self.stop_at_eos and token in self.eos_ids:
            row.done = True
            return
        row.out.append(token)
        self.stats["generated_tokens"] += 1
        if len(row.out) >= row.max_new or (row.stop and self._hit_stop(row)):
            row.done = True

    def _hit_stop(self, row: _Row) -> bool:
        # A stop string of L characters lies within the last L tokens (each token
        # decodes to at least one character); a few more cover partial bytes.
        window = max(len(s) for s in row.stop) + 4
        tail = self.tokenizer.decode(row.out[-window:], skip_special_tokens=True)
        return first_stop(tail, row.stop) is not None


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum()
