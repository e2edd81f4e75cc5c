"""`twophase bench decode`: where one decode step's time goes, against the memory-bandwidth floor.

A decode step of B rows reads every weight once (the same bytes whatever B is) and,
per row, the keys and values of every cached column. Both are memory reads, so the
step's floor on a card of bandwidth W bytes/s is

    floor(kv_len) = (weight bytes + B · kv_len · layers · 2 · kv_heads · head_dim · 2 bytes) / W

The cache term is what a "weights only" bound leaves out: for the 7B prover at 16
rows and 712 columns (200-token prompts + 512 new tokens) it is 5.5 GB a step at the
end, 40 % of the weights' 13.8 GB.

What this measures, with the real decoder (eval/engine/decoder.py, CUDA graphs on):

* the step time at several cache lengths (replayed graphs, synchronised, median of
  `repeats`), beside the floor at that length, and their ratio;
* with `--profile`, one kernel-level trace of `steps` replayed steps at the longest
  length: the kernels' time by kind (matrix products, attention, compiled
  element-wise kernels, sampling, copies) and the rest of the step, which is time
  the GPU spends between kernels (a graph replay has no host launches left).
"""

from __future__ import annotations

import statistics
import time

import torch

from twophase.launch.bench.kernel_profile import profile_call

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM cards' published figures


def bandwidth_of(device_name: str) -> float | None:
    return next((bw for card, bw in BANDWIDTH.items() if card in device_name), None)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) - model.get_input_embeddings().weight.nbytes


def cache_bytes_per_step(config, rows: int, kv_len: int, element_size: int = 2) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return rows * kv_len * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element_size


def step_times(decoder, sampling, lengths: list[int], repeats: int) -> dict[int, float]:
    """Seconds per replayed decode step at each cache length (the same slots, the graph of that length)."""
    synchronize = torch.cuda.synchronize if decoder.device.type == "cuda" else lambda: None
    times = {}
    for kv_len in lengths:
        decoder.column.fill_(kv_len - 1)
        decoder._step(decoder.slots, kv_len, sampling)  # captures once
        samples = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            for _ in range(8):
                decoder.column.fill_(kv_len - 1)
                decoder._step(decoder.slots, kv_len, sampling)
            synchronize()
            samples.append((time.perf_counter() - start) / 8)
        times[kv_len] = statistics.median(samples)
    return times


def decode_profile(decoder, sampling, kv_len: int, steps: int) -> dict:
    """Kernel time of `steps` replayed decode steps at cache length `kv_len`, per step."""
    decoder.column.fill_(kv_len - 1)  # each step writes its column and moves on: keep it inside the cache
    decoder._step(decoder.slots, kv_len, sampling)

    def replay():
        for _ in range(steps):
            decoder.column.fill_(kv_len - 1)
            decoder._step(decoder.slots, kv_len, sampling)

    return profile_call(replay, per=steps)


def bench_decode(architecture: str, rows: int = 16, prompt_len: int = 200, new_tokens: int = 512, repeats: int = 5,
                 profile_steps: int = 0, top_p: float = 1.0, device: str = "cuda", report=None) -> dict:  # fmt: skip
    """The decoder alone at GRPO's shape: `rows` rows continuing two prompts (two groups).

    `report(result)` is called with the timings before the profile is taken, so they survive a profiler failure.
    """
    from twophase.eval.engine.decoder import StaticDecoder
    from twophase.eval.engine.sampling import SamplingParams
    from twophase.launch.bench.training import random_model

    device = torch.device(device)
    model = random_model(architecture, device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    decoder = StaticDecoder(model, rows, cuda_graphs=True)
    sampling = SamplingParams(temperature=1.0, top_p=top_p)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (prompt_len,), generator=generator).tolist() for _ in range(2)]
    expand = [row * 2 // rows for row in range(rows)]
    with torch.no_grad():
        decoder.start(prompts, expand, sampling, list(range(rows)), new_tokens, 16)
        block = decoder.kv_block
        lengths = sorted({-(-columns // block) * block for columns in (prompt_len + 1, prompt_len + new_tokens // 2, prompt_len + new_tokens)})
        last = lengths[-1]  # the columns a decode step attends over: its cache length rounded up to whole blocks
        times = step_times(decoder, sampling, lengths, repeats)
        result = _timing_result(architecture, model, device, rows, prompt_len, new_tokens, times)
        if report:
            report(result)
        if profile_steps:
            result["profile"] = decode_profile(decoder, sampling, last, profile_steps)
    return result


def _timing_result(architecture, model, device, rows, prompt_len, new_tokens, times) -> dict:
    from twophase.launch.bench.training import device_name

    name = device_name(device)
    bandwidth = bandwidth_of(name)
    weights = weight_bytes(model)
    by_length = {}
    for kv_len, seconds in times.items():
        floor = (weights + cache_bytes_per_step(model.config, rows, kv_len)) / bandwidth if bandwidth else None
        by_length[kv_len] = {"step_ms": round(seconds * 1e3, 3), "tokens_per_s": round(rows / seconds),
                             "floor_ms": round(floor * 1e3, 3) if floor else None,
                             "share_of_bandwidth": round(floor / seconds, 3) if floor else None}  # fmt: skip
    return {"benchmark": "decode", "architecture": architecture, "device": name, "rows": rows, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "weight_gb": round(weights / 1e9, 2), "by_kv_len": by_length}  # fmt: skip
