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


# --------------------------------------------------------------------------- the update's invariances (float64)


def _update_gradient(recipe, process_rows: list[range], micro_batch_size: int) -> torch.Tensor:
    """The step's gradient as the loop forms it: each process's micro-batches backward, then summed over processes."""
    params = [p for p in recipe.model.parameters() if p.requires_grad]
    recipe.model.zero_grad(set_to_none=True)
    for rows in process_rows:  # a process sees only its rows; the normaliser spans every process's
        for start in range(rows.start, rows.stop, micro_batch_size):
            mb = recipe.rollout.micro_batch(slice(start, min(start + micro_batch_size, rows.stop)), recipe.device)
            loss, _ = recipe.loss(mb)
            loss.backward()
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_the_update_is_invariant_to_micro_batch_size_and_to_process_slices(aggregation, tiny_model_dir, tmp_path):
    """In float64 the summed micro-batch losses are the whole batch's loss: one micro-batch of 8 rows, micro-batches
    of 1 or 3, or two processes of 4 rows each, give the same gradient; and it is the gradient of the loss computed
    on the whole batch at once (grpo_loss without a normaliser)."""
    from twophase.losses.grpo import grpo_loss
    from twophase.losses.logprobs import response_mask, token_logprobs_of

    (tmp_path / "r").mkdir()
    recipe = GRPORecipe(_config(tiny_model_dir, tmp_path / "r", aggregation=aggregation, micro_batch_size=8), tmp_path / "r")
    recipe.step_batches(0)  # generates and scores the rollout: 2 prompts x 4 completions
    recipe.model.double()
    rows = len(recipe.rollout)
    assert rows == 8 and recipe.rollout.advantages.abs().sum() > 0  # the toy reward spreads: real advantages
    whole = _update_gradient(recipe, [range(rows)], rows)
    for process_rows, micro_batch_size in (([range(rows)], 1), ([range(rows)], 3), ([range(0, 4), range(4, 8)], 2)):
        torch.testing.assert_close(_update_gradient(recipe, process_rows, micro_batch_size), whole, rtol=1e-12, atol=1e-15)

    batch = recipe.rollout.micro_batch(slice(0, rows), recipe.device, trim=False)
    recipe.model.zero_grad(set_to_none=True)
    logps = token_logprobs_of(recipe.model, batch.input_ids, batch.attention_mask, batch.labels, 64)
    loss, _ = grpo_loss(logps, logps.detach(), batch.advantages, response_mask(batch.labels), aggregation=aggregation,
                        max_response_length=recipe.config.max_new_tokens)  # fmt: skip
    loss.backward()
    at_once = torch.cat([p.grad.flatten() for p in recipe.model.parameters() if p.requires_grad])
    torch.testing.assert_close(at_once, whole, rtol=1e-12, atol=1e-15)
