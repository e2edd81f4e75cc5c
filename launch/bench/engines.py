"""Speed and memory of the two engines on benchmark-shaped workloads.

`bench_engines` times the shared engines, not a benchmark, on synthetic
requests shaped like the real ones, so a randomly initialised model is enough:

* log-likelihood, MMLU-shaped: a ~600-token context (as long as a 5-shot MMLU
  prompt) of random text, followed by the four single-token choices " A" .. " D";
  one forward per question when the choices are single tokens;
* generation, StrongREJECT-shaped: ~40-token prompts, 256 new tokens, greedy,
  with EOS ignored so every row really generates all 256 tokens.

It reports questions/s, tokens/s and peak CUDA memory (None on CPU). A batch
size that does not fit is reported as out of memory instead of raising, so a
sweep over batch sizes can find the largest one that fills the card.
"""

from __future__ import annotations

import random
import time

import torch

from twophase.data.tokens import encode_continuation
from twophase.eval.engine.loglikelihood import LoglikelihoodEngine, LoglikelihoodRequest
from twophase.eval.engine.generation import GenerationEngine, GenerationRequest

CHOICES = (" A", " B", " C", " D")


def random_texts(tokenizer, count: int, tokens: int, seed: int) -> list[str]:
    """`count` texts of about `tokens` tokens each, decoded from random non-special token ids."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    texts = []
    for _ in range(count):
        ids = [rng.choice(vocab) for _ in range(tokens)]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        # Decoding and re-encoding random ids changes the count a little; trim to the target.
        ids = encode_continuation(tokenizer, text)[:tokens]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)


def _timed(device: torch.device, fn):
    """(result, seconds, peak GiB), or (None, seconds, peak) with oom=True when it ran out of memory."""
    _reset_peak(device)
    start = time.perf_counter()
    try:
        result, oom = fn(), False
    except torch.cuda.OutOfMemoryError:
        result, oom = None, True
        torch.cuda.empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start, _peak_gib(device), oom


def bench_loglikelihood(model, tokenizer, batch_size: int, n_questions: int, context_tokens: int = 600, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    contexts = random_texts(tokenizer, n_questions, context_tokens, seed)
    requests = [LoglikelihoodRequest(c + "\nAnswer:", choice) for c in contexts for choice in CHOICES]
    engine = LoglikelihoodEngine(model, tokenizer, batch_size=batch_size)
    engine.loglikelihood(requests[: 4 * min(batch_size, n_questions)], desc="warm-up")  # kernels, allocator
    engine.stats = {k: 0 if isinstance(v, int) else 0.0 for k, v in engine.stats.items()}
    _, seconds, peak, oom = _timed(device, lambda: engine.loglikelihood(requests, desc="bench loglikelihood"))
    single = all(len(encode_continuation(tokenizer, c)) == 1 for c in CHOICES)
    return {
        "workload": "mmlu-shaped log-likelihood",
        "batch_size": batch_size,
        "questions": n_questions,
        "requests": len(requests),
        "choices_single_token": single,
        "forwards": engine.stats["forwards"],
        "rows": engine.stats["rows"],
        "mean_row_tokens": None if oom else round(engine.stats["tokens"] / max(1, engine.stats["rows"]), 1),
        "seconds": round(seconds, 3),
        "questions_per_s": None if oom else round(n_questions / seconds, 3),
        "tokens_per_s": None if oom else round(engine.stats["tokens"] / seconds, 1),
        "peak_memory_gib": peak,
        "oom": oom,
    }


def bench_generation(model, tokenizer, batch_size: int, n_prompts: int, prompt_tokens: int = 40,
                     max_new_tokens: int = 256, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    prompts = random_texts(tokenizer, n_prompts, prompt_tokens, seed + 1)
    requests = [GenerationRequest(p, max_new_tokens=max_new_tokens) for p in prompts]
    engine = GenerationEngine(model, tokenizer, batch_size=batch_size, seed=seed, stop_at_eos=False)
    # Warm-up: one batch of the real shape, so every CUDA graph the timed run needs is captured.
    engine.generate(requests[:batch_size], desc="warm-up")
    engine.stats = {k: 0 if isinstance(v, int) else 0.0 for k, v in engine.stats.items()}
    _, seconds, peak, oom = _timed(device, lambda: engine.generate(requests, desc="bench generation"))
    generated = engine.stats["generated_tokens"]
    return {
        "workload": "strongreject-shaped generation",
        "batch_size": batch_size,
        "prompts": n_prompts,
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "generated_tokens": None if oom else generated,
        "seconds": round(seconds, 3),
        "questions_per_s": None if oom else round(n_prompts / seconds, 3),
        "tokens_per_s": None if oom else round(generated / seconds, 1),
        "peak_memory_gib": peak,
        "oom": oom,
    }


def bench_engines(
    model,
    tokenizer,
    loglik_batch_size: int,
    gen_batch_size: int,
    n_questions: int,
    n_prompts: int | None = None,
    context_tokens: int = 600,
    prompt_tokens: int = 40,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> dict:
    """Both workloads on `model`; n_prompts defaults to n_questions. Works on CPU and GPU."""
    model.eval()
    device = next(model.parameters()).device
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loglikelihood": bench_loglikelihood(model, tokenizer, loglik_batch_size, n_questions, context_tokens, seed),
        "generation": bench_generation(model, tokenizer, gen_batch_size, n_prompts or n_questions, prompt_tokens, max_new_tokens, seed),
    }
    if device.type == "cuda":
        out["memory_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 1024**3, 2)
    return out
