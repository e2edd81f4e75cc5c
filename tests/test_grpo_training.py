"""The GRPO recipe on the shared loop: rollouts, learning a toy reward, μ > 1, KL, exact resume."""

import json
from pathlib import Path

import pytest
import torch

from twophase.losses.logprobs import IGNORE_INDEX
from twophase.trainers.config import GRPOConfig, make_config
from twophase.trainers.grpo import GRPORecipe, build_rewards, run_grpo
from twophase.trainers.infra.run import MetricsLog
from twophase.eval.engine.sampling import SamplingParams
from twophase.trainers.rollouts import sample_completions

LEAN_DEMO = str(Path(__file__).resolve().parents[1] / "data" / "samples" / "lean_demo.jsonl")


def _config(model_dir, out_dir, **overrides):
    values = dict(
        model=model_dir, dataset=LEAN_DEMO, out_dir=str(out_dir), max_steps=4, prompts_per_step=2, num_generations=4,
        max_new_tokens=12, micro_batch_size=4, lr=1e-2, reward="toy", precision="fp32", device="cpu",
        save_every=0, log_every=0, optimizer="adamw", lora=False,
    )  # fmt: skip
    values.update(overrides)
    return make_config(GRPOConfig, values)


def test_twenty_steps_mean_toy_reward_rises(tiny_model_dir, tmp_path):
    out = run_grpo(_config(tiny_model_dir, tmp_path / "run", max_steps=20, num_generations=8, max_new_tokens=24, micro_batch_size=8))
    records = MetricsLog(Path(out["metrics"])).read()
    first = sum(r["reward/mean"] for r in records[:5]) / 5
    last = sum(r["reward/mean"] for r in records[-5:]) / 5
    assert last > first + 0.05, (first, last)
    for key in ("reward/std", "reward/toy", "reward/zero_spread_groups", "completion/length_mean", "completion/length_min",
                "completion/length_max", "completion/truncated_fraction", "clip_fraction_low", "clip_fraction_high",
                "grad_norm", "time/generation_s", "time/update_s", "tokens_per_s", "generation_tokens_per_s"):
        assert key in records[-1], key
    samples = [json.loads(line) for line in Path(out["samples"]).read_text().splitlines()]
    assert len(samples) == 20 * 2 * 8
    assert {"step", "task_id", "completion", "reward", "rewards", "advantage", "length", "truncated"} <= set(samples[0])
    # the first group's advantages, recomputed in float64 from its rewards: centred, scaled by the group's std
    rewards = torch.tensor([s["reward"] for s in samples[:8]], dtype=torch.float64)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    assert [s["advantage"] for s in samples[:8]] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert float(expected.sum()) == pytest.approx(0.0, abs=1e-9)


def test_training_logprobs_equal_the_samplers(tiny_model_dir, tmp_path):
    """Left-padded rollouts re-scored by the training forward give the sampling distribution's log-probs."""
    recipe = GRPORecipe(_config(tiny_model_dir, tmp_path / "r"), tmp_path / "r")
    model = recipe.model
    prompts = [recipe.prompts[0], recipe.prompts[1][:40]]  # different lengths: real left padding
    rollout = sample_completions(recipe.generator, prompts, 2, 6, SamplingParams(temperature=1.0), seeds=[1, 2, 3, 4])
    assert (rollout.attention_mask[:, 0] == 0).any()  # some row is left-padded
    from twophase.losses.logprobs import token_logprobs_of

    model.eval()
    with torch.no_grad():
        logps = token_logprobs_of(model, rollout.input_ids, rollout.attention_mask, rollout.labels, 64)
        # score each row alone, unpadded: the reference
        for row in range(len(rollout)):
            keep = rollout.attention_mask[row].bool()
            ids, labels = rollout.input_ids[row][keep][None], rollout.labels[row][keep][None]
            alone = token_logprobs_of(model, ids, torch.ones_like(ids), labels, 64)
            batched = logps[row][keep[1:]]
            torch.testing.assert_close(batched.sum(), alone.sum(), rtol=0, atol=1e-4)
    # The update's log-probabilities of the sampled tokens are the sampler's own (float32, CPU).
    labelled = rollout.labels[:, 1:] != IGNORE_INDEX
    assert labelled.sum() == sum(rollout.completion_lengths)
    torch.testing.assert_close(logps[labelled], rollout.sampler_logprobs[labelled], rtol=0, atol=2e-5)


def test_rollout_layout_masks_prompt_and_padding(tiny_model_dir, tmp_path):
    recipe = GRPORecipe(_config(tiny_model_dir, tmp_path / "r"), tmp_path / "r")
    rollout = sample_completions(recipe.generator, recipe.prompts[:2], 3, 5, SamplingParams(temperature=1.0), seeds=list(range(6)))
    assert len(rollout) == 6
    for row in range(6):
        labelled = (rollout.labels[row] != IGNORE_INDEX).sum().item()
        assert labelled == rollout.completion_lengths[row] <= 5
        # labels sit on attended tokens only, at the end of the prompt region
        assert ((rollout.labels[row] != IGNORE_INDEX) <= rollout.attention_mask[row].bool()).all()


def test_mu_two_with_kl_reference_and_exact_resume(tiny_model_dir, tmp_path, monkeypatch):
    settings = dict(num_iterations=2, beta=0.1, max_steps=4, lora=True, lora_r=4, lora_alpha=8, lr=5e-3)
    straight = run_grpo(_config(tiny_model_dir, tmp_path / "straight", **settings))
    records = MetricsLog(Path(straight["metrics"])).read()
    assert all(r["kl"] >= 0 for r in records)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert "reward/mean" in records[0] and "reward/mean" not in records[1]  # one generation per μ = 2 steps
    samples = Path(straight["samples"]).read_text().splitlines()
    assert len(samples) == 2 * 2 * 4  # two generation batches of 2 prompts × 4

    original = GRPORecipe.step_batches

    def interrupt_inside_generation_batch(self, step):
        if step == 3:  # step 3 reuses the rollout generated at step 2
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(GRPORecipe, "step_batches", interrupt_inside_generation_batch)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(_config(tiny_model_dir, tmp_path / "resumed", **settings))
    monkeypatch.setattr(GRPORecipe, "step_batches", original)
    resumed = run_grpo(_config(tiny_model_dir, tmp_path / "resumed", **settings), resume=True)
    from safetensors.torch import load_file

    a = load_file(str(Path(straight["final"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["final"]) / "adapter_model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert Path(resumed["samples"]).read_text().splitlines() == samples


def test_reward_options_per_reward_and_random_seed_default(tmp_path):
    config = make_config(GRPOConfig, dict(reward="random,zero", seed=7))
    rewards = build_rewards(config)
    assert set(rewards) == {"random", "zero"}
    assert rewards["random"].seed == 7
