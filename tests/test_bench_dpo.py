"""`twophase bench dpo`: the synthetic tokenizer, the shipped HH-RLHF length profile, and what a result counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twophase.data.collators import PreferenceCollator
from twophase.data.hh_rlhf import load_hh_rlhf
from twophase.data.base.sampler import EpochSampler
from twophase.launch.bench.training import bench_dpo, random_model, synthetic_tokenizer
from twophase.launch.bench.length_profile import derive_length_profile, load_length_profile, summarize, truncated_lengths

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples" / "hh_demo.jsonl"


def test_synthetic_tokenizer_ids_stay_inside_the_vocabulary():
    tokenizer = synthetic_tokenizer(2048)
    assert len(tokenizer) == 2048
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("<s> t5 t2047 t2048 word </s>")["input_ids"]
    assert ids == [1, 5, 2047, 3, 3, 2]  # unknown words are t3
    assert tokenizer.decode([0, 1, 2, 17]) == "<pad> <s> </s> t17"
    model = random_model("tiny", torch.device("cpu"), torch.float32)
    model(torch.tensor([ids + tokenizer.all_special_ids]))  # indexes the embedding: no id past its end


def test_length_profile_counts_tokens_as_the_trainer_does(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, _ = load_hh_rlhf(str(SAMPLES))
    counts = derive_length_profile(pairs, tokenizer)
    collator = PreferenceCollator(tokenizer)
    assert counts == [tuple(len(part) for part in collator.token_ids(pair)) for pair in pairs]
    first = pairs[0]
    assert counts[0] == (
        len(tokenizer(first.prompt)["input_ids"]),  # BOS included by this tokenizer
        len(tokenizer(first.chosen, add_special_tokens=False)["input_ids"]) + 1,  # + EOS
        len(tokenizer(first.rejected, add_special_tokens=False)["input_ids"]) + 1,
    )

    no_bos = AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=False)
    no_bos._tokenizer.post_processor = None  # a tokenizer that adds nothing, like DeepSeek's newer ones
    assert derive_length_profile(pairs, no_bos) == counts  # BOS still counted once


def test_truncated_lengths_follow_the_trainer_rule():
    counts = [(700, 100, 400), (30, 2000, 10), (600, 200, 900), (100, 100, 100)]
    # prompt + longer reply > 1024: the prompt goes to 512; still too long: replies to 1024 - 512
    assert truncated_lengths(counts, 1024, 512) == [(512, 100, 400), (30, 512, 10), (512, 200, 512), (100, 100, 100)]


def test_the_shipped_hh_profile_is_consistent():
    import json
    from importlib import resources

    profile = json.loads(resources.files("twophase.launch.bench").joinpath("profiles", "hh_rlhf_harmless_base_test.json").read_text())
    counts = load_length_profile("hh-rlhf")
    assert len(counts) == 2303  # usable pairs of the 2,312-row harmless-base test split
    assert all(p >= 1 and c >= 1 and r >= 1 for p, c, r in counts)  # BOS and EOS at least
    assert summarize(counts) == profile["summary"]


def test_hh_benchmark_counts_tokens_as_trl_does():
    """tokens_per_step is the prompt twice and each reply once, of exactly the pairs the sampler gives step 2."""
    result = bench_dpo("tiny", steps=2, micro_batch_size=2, grad_accum_steps=2, lengths="hh-rlhf",
                       layout="packed_shared_prompt", tokens_per_pass=4096, lora_r=4, optimizer="adamw", device="cpu",
                       warmup_steps=1)  # fmt: skip
    counts = load_length_profile("hh-rlhf")
    step_two = EpochSampler(len(counts), seed=0).indices(4, 4)
    expected = sum(2 * p + c + r for p, c, r in truncated_lengths([counts[i] for i in step_two], 1024, 512))
    assert result["tokens_per_step"] == expected
    assert result["layout"] == "packed_shared_prompt" and result["lengths"] == "hh-rlhf"
    assert result["step_s_min"] == result["step_s_median"] == result["step_s_max"]  # one measured step
    assert result["tokens_per_s"] == pytest.approx(expected / result["step_s_median"], rel=1e-2)


@pytest.mark.parametrize("lengths", ["fixed", "hh-rlhf"])
def test_trl_baseline_gets_the_benchmark_pairs_token_for_token(lengths):
    """TRL tokenizes prompt, prompt + chosen + EOS text and prompt + rejected + EOS text; those must be our ids."""
    from twophase.launch.bench.training import dpo_truncation, pair_lengths_of, synthetic_pair
    from twophase.launch.bench.trl_baseline import dpo_rows

    tokenizer = synthetic_tokenizer(2048)
    rows = dpo_rows(lengths, 8, seq_len=64, vocab_size=2048)
    pair_lengths = pair_lengths_of(lengths, 64, 32, 8)
    order = EpochSampler(len(pair_lengths), seed=0).indices(0, 8)  # the benchmark's first steps, in order
    for row, index in zip(rows, order):
        pair = synthetic_pair(index, pair_lengths[index], 2048, *dpo_truncation(lengths, 64, 32))
        ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        assert ids(row["prompt"]) == pair.prompt
        assert ids(row["prompt"] + row["chosen"] + "</s>") == pair.prompt + pair.chosen
        assert ids(row["prompt"] + row["rejected"] + "</s>") == pair.prompt + pair.rejected


def test_bench_runs_the_sharded_path_in_a_one_process_group():
    """--process-group: GRPO trains FSDP2-sharded and generates from the gathered copy, in this one process.
    The copy is the policy: before any update on a rollout the sampler's log-probs are the policy's."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "twophase.launch.cli", "bench", "grpo", "--arch", "tiny", "--steps", "2",
               "--max-new-tokens", "6", "--process-group"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["processes"], report["process_group"], report["completions_per_step"]) == (1, True, 16)
    assert report["sampler_logprob_gap"] < 1e-5


@pytest.mark.parametrize("architecture, parameters", [
    ("deepseek-prover-v2-7b", 6_910_365_696), ("qwen2.5-7b", 7_615_616_512), ("llama-3-8b", 8_030_261_248),
])  # fmt: skip
def test_bench_architectures_have_the_published_parameter_counts(architecture, parameters):
    """Built on the meta device (no memory): the counts the models' cards give (Qwen2.5-7B 7.61B with its q/k/v biases)."""
    model = random_model(architecture, torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_bench_decode_times_and_profiles_every_cache_length_inside_the_cache():
    """The decoder at GRPO's shape on the CPU: each length rounded up to whole 64-column blocks, the profile's steps
    written inside the cache (on the GPU a step past its end was a device-side assert), 16 tokens per step."""
    from twophase.launch.bench.decode_profile import bench_decode, cache_bytes_per_step

    reported = []
    result = bench_decode("tiny", rows=16, prompt_len=200, new_tokens=512, repeats=1, profile_steps=2, device="cpu",
                          report=reported.append)  # fmt: skip
    assert list(result["by_kv_len"]) == [256, 512, 768]  # 201, 456 and 712 columns, rounded up
    assert reported and "profile" in result and result["profile"]["kernels"] == 0  # no CUDA kernels on a CPU
    timing = result["by_kv_len"][768]
    assert timing["tokens_per_s"] == pytest.approx(16 / (timing["step_ms"] / 1e3), rel=0.01)
    model = random_model("tiny", torch.device("cpu"), torch.float32)
    assert cache_bytes_per_step(model.config, 16, 768) == 16 * 768 * 2 * 2 * 4 * 16 * 2  # rows·columns·layers·(k, v)·heads·dim·bf16
