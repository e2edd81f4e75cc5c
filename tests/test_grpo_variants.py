"""The published GRPO variants as switches: GSPO's sequence ratio, DAPO's dynamic sampling, the `algorithm:` presets.

Loss values and gradients are checked in float64 against the papers' formulas, computed here independently.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from twophase.data.base.errors import UserError
from twophase.losses.grpo import grpo_loss, gspo_loss, loss_normaliser
from twophase.trainers.config import ALGORITHM_PRESETS, GRPOConfig, load_config, make_config, save_config
from twophase.losses.grpo import informative_groups
from twophase.trainers.dynamic_sampling import fill_with_informative_groups
from twophase.trainers.rollouts import RolloutBatch

F64 = torch.float64


# --------------------------------------------------------------------------- GSPO (Zheng et al., 2025)


def _two_sequences():
    """Sequence 0 has 3 response tokens, sequence 1 has 2 (its third column is padding)."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -9.0]], dtype=F64)
    deltas = torch.tensor([[0.3, -0.1, 0.1], [-0.4, 0.0, 5.0]], dtype=F64)  # logp − old; 5.0 sits on padding
    logps = (old + deltas).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    return logps, old, mask


def test_gspo_sequence_ratio_value_and_gradient_by_hand():
    logps, old, mask = _two_sequences()
    advantages = torch.tensor([1.5, -2.0], dtype=F64)
    loss, metrics = gspo_loss(logps, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    # s_0 = exp((0.3 − 0.1 + 0.1)/3) = exp(0.1) ≈ 1.105, inside [0.8, 1.2]; s_1 = exp(−0.4/2) = exp(−0.2) ≈ 0.819, inside
    s0, s1 = math.exp(0.1), math.exp(-0.2)
    assert loss.item() == pytest.approx((-(s0 * 1.5) - (s1 * -2.0)) / 2, rel=1e-12)  # mean over sequences
    loss.backward()
    # ∇ℓ_i = −A_i·s_i/|y_i| on each of its response tokens, / B = 2; the padding gets nothing
    expected = torch.tensor([[-1.5 * s0 / 3 / 2] * 3, [2.0 * s1 / 2 / 2] * 2 + [0.0]], dtype=F64)
    torch.testing.assert_close(logps.grad, expected, rtol=1e-12, atol=0)
    assert metrics == {"clip_fraction_low": 0.0, "clip_fraction_high": 0.0}


def test_gspo_clips_whole_sequences_at_the_papers_range():
    logps, old, mask = _two_sequences()
    advantages = torch.tensor([1.5, -2.0], dtype=F64)
    loss, metrics = gspo_loss(logps, old, advantages, mask)  # defaults: the paper's 3e-4 / 4e-4
    # s_0 = e^0.1 > 1 + 4e-4 with A > 0: clipped at 1.0004; s_1 = e^−0.2 < 1 − 3e-4 with A < 0: clipped at 0.9997
    assert loss.item() == pytest.approx((-(1.0004 * 1.5) + (0.9997 * 2.0)) / 2, rel=1e-12)
    assert metrics == {"clip_fraction_low": 2 / 5, "clip_fraction_high": 3 / 5}  # the tokens of the clipped sequences
    loss.backward()
    assert logps.grad.abs().max().item() == 0  # a clipped sequence gets no gradient, on any of its tokens
    # the other side of the min: A < 0 with s > 1 + ε is not clipped (−min(sA, clip(s)A) = −sA), so it has a gradient
    logps.grad = None
    loss, _ = gspo_loss(logps, old, torch.tensor([-1.0, 0.0], dtype=F64), mask)
    loss.backward()
    torch.testing.assert_close(logps.grad[0], torch.full((3,), math.exp(0.1) / 3 / 2, dtype=F64), rtol=1e-12, atol=0)


def test_gspo_equals_grpo_when_every_sequence_has_one_token():
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(5, 1, dtype=F64, generator=generator)
    start = old + 0.3 * torch.randn(5, 1, dtype=F64, generator=generator)  # some ratios outside [0.8, 1.28]
    advantages = torch.randn(5, dtype=F64, generator=generator)
    mask = torch.ones(5, 1, dtype=F64)
    results = []
    for loss_of in (grpo_loss, gspo_loss):
        logps = start.clone().requires_grad_()
        loss, metrics = loss_of(logps, old, advantages, mask, clip_low=0.2, clip_high=0.28, aggregation="sequence")
        loss.backward()
        results.append((loss.item(), logps.grad, metrics))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-14)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-14, atol=0)
    assert results[0][2] == results[1][2]
    assert 0 < results[0][2]["clip_fraction_low"] + results[0][2]["clip_fraction_high"]  # the case did clip


def test_gspo_micro_batch_shares_add_up_and_kl_is_per_token():
    generator = torch.Generator().manual_seed(1)
    logps = torch.randn(4, 5, dtype=F64, generator=generator).requires_grad_()
    old = logps.detach() + 0.01 * torch.randn(4, 5, dtype=F64, generator=generator)
    ref = logps.detach() + 0.2 * torch.randn(4, 5, dtype=F64, generator=generator)
    advantages = torch.randn(4, dtype=F64, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=F64)
    kwargs = dict(ref_logps=ref, beta=0.1, clip_low=0.2, clip_high=0.2)
    whole, metrics = gspo_loss(logps, old, advantages, mask, **kwargs)
    normaliser = loss_normaliser("sequence", 4, float(mask.sum()), 5)
    shares = [gspo_loss(logps[r], old[r], advantages[r], mask[r], normaliser=normaliser, **{**kwargs, "ref_logps": ref[r]})[0]
              for r in (slice(0, 1), slice(1, 4))]  # fmt: skip
    assert float(sum(shares).detach()) == pytest.approx(float(whole.detach()), rel=1e-13)
    # by hand: mean over sequences of ( −min(sA, clip(s)A) + β·mean_t k3 )
    s = torch.exp(((logps.detach() - old) * mask).sum(1) / mask.sum(1))
    surrogate = -torch.min(s * advantages, s.clamp(0.8, 1.2) * advantages)
    d = ref - logps.detach()
    k3 = torch.exp(d) - d - 1
    expected = (surrogate + 0.1 * (k3 * mask).sum(1) / mask.sum(1)).mean()
    assert float(whole.detach()) == pytest.approx(float(expected), rel=1e-13)
    assert metrics["kl"] == pytest.approx(float((k3 * mask).sum() / mask.sum()), rel=1e-13)


# --------------------------------------------------------------------------- the algorithm presets


def test_each_preset_expands_to_its_papers_switches():
    expected = {  # name: (advantage_scale, aggregation, clip_low, clip_high, beta, importance_ratio, dynamic_sampling)
        "grpo": ("group", "sequence", 0.2, 0.2, 0.04, "token", False),
        "dr_grpo": ("none", "constant", 0.2, 0.2, 0.0, "token", False),
        "dapo": ("group", "token", 0.2, 0.28, 0.0, "token", True),
        "gspo": ("group", "sequence", 3e-4, 4e-4, 0.0, "sequence", False),
    }
    assert set(ALGORITHM_PRESETS) == set(expected)
    for name, switches in expected.items():
        config = load_config(GRPOConfig, None, [f"algorithm={name}"])
        got = (config.advantage_scale, config.aggregation, config.clip_low, config.clip_high, config.beta,
               config.importance_ratio, config.dynamic_sampling)  # fmt: skip
        assert got == switches, name


def test_explicit_switches_override_the_preset_and_config_json_records_the_expansion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm: gspo\nclip_high: 0.001\n")
    config = load_config(GRPOConfig, path, ["beta=0.01"])
    assert (config.clip_low, config.clip_high, config.beta, config.importance_ratio) == (3e-4, 0.001, 0.01, "sequence")
    save_config(config, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["algorithm"], saved["aggregation"], saved["clip_low"], saved["clip_high"]) == ("gspo", "sequence", 3e-4, 0.001)
    # reading the saved, expanded config again gives the same run
    assert make_config(GRPOConfig, saved) == config


def test_the_algorithm_line_names_preset_ratio_and_dynamic_sampling():
    from twophase.trainers.grpo import algorithm_line

    line = algorithm_line(load_config(GRPOConfig, None, ["algorithm=gspo"]))
    assert line.startswith("GRPO (gspo preset): group-normalised advantages, sequence-level aggregation (DeepSeekMath)")
    assert line.endswith("clip 0.0003/0.0004 (clip-higher), sequence-level importance ratio (GSPO)")
    dapo = algorithm_line(load_config(GRPOConfig, None, ["algorithm=dapo", "dynamic_sampling_max_batches=4"]))
    assert dapo.endswith("clip 0.2/0.28 (clip-higher), dynamic sampling (DAPO) in at most 4 generation batches")


def test_unknown_algorithm_is_one_line_naming_the_valid_ones(tmp_path):
    from click.testing import CliRunner

    from twophase.launch.cli import cli

    with pytest.raises(UserError, match="algorithm = 'ppo' .* is not one of: grpo, dr_grpo, dapo, gspo"):
        load_config(GRPOConfig, None, ["algorithm=ppo"])
    result = CliRunner().invoke(cli, ["grpo", "--set", "algorithm=ppo", "--set", f"out_dir={tmp_path / 'x'}"])
    assert result.exit_code == 2
    assert "is not one of: grpo, dr_grpo, dapo, gspo" in result.output
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- DAPO's dynamic sampling (Yu et al., 2025)


def test_informative_groups_are_those_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert informative_groups(rewards, 4) == [True, False, False]
    assert informative_groups(rewards, 3) == [False, True, True, False]


class _Draws:
    """A stand-in for the GRPO recipe: batch k of the step has the rewards `rewards[k]` (one list per group)."""

    def __init__(self, rewards: list[list[list[float]]], group: int = 2, max_batches: int = 3, prompts: int = 2):
        self.config = GRPOConfig(num_generations=group, prompts_per_step=prompts, dynamic_sampling=True,
                                 dynamic_sampling_max_batches=max_batches)  # fmt: skip
        self.tasks = list(range(10))
        self.tokenizer = type("Tokenizer", (), {"pad_token_id": 0, "eos_token_id": 0})()
        self.rewards, self.drawn = rewards, []

    def _draw(self, prompts, generation_step, step):
        self.drawn.append(generation_step)
        return self.batch(len(self.drawn))

    def batch(self, k: int):
        """Batch k: rows of width 3 + k (widths differ between batches), tokens naming (batch, row)."""
        groups = self.rewards[k]
        rows = sum(len(g) for g in groups)
        ids = torch.tensor([[100 * k + r] * (3 + k) for r in range(rows)])
        labels = ids.clone()
        labels[:, :2] = -100
        rollout = RolloutBatch(ids, torch.ones_like(ids), labels, torch.zeros(rows, 2 + k),
                               completions=[f"{k}:{r}" for r in range(rows)], completion_lengths=[1 + k] * rows,
                               truncated=[False] * rows, generation_seconds=1.0)  # fmt: skip
        report = {"scores": {"r": [v for g in groups for v in g]}, "completions": rollout.completions,
                  "task_ids": [f"t{k}:{r}" for r in range(rows)], "details": {"r": None}, "generation_seconds": 1.0}  # fmt: skip
        return [f"task{k}:{r}" for r in range(rows)], (rollout, range(rows), 0.0), [report]


def test_dynamic_sampling_fills_the_step_with_informative_groups_only():
    draws = _Draws([[[1, 1], [0, 1]], [[0, 0], [1, 1]], [[1, 0], [0, 1]]])
    tasks, (rollout, _, _), reports = draws.batch(0)
    tasks, rollout, reports = fill_with_informative_groups(draws, tasks, rollout, reports, generation_step=7, step=7)
    assert draws.drawn == ["7.1", "7.2"]  # two extra batches, with their own sampling seeds
    # batch 0's informative group 1, then batch 2's group 0 (batch 1 had none); batch 2's group 1 is not needed
    assert rollout.completions == ["0:2", "0:3", "2:0", "2:1"]
    assert tasks == ["task0:2", "task0:3", "task2:0", "task2:1"]
    assert reports[0]["scores"]["r"] == [0, 1, 1, 0]
    assert reports[0]["dynamic_sampling"] == {"dynamic_sampling/batches": 3.0, "dynamic_sampling/dropped": 3.0,
                                              "dynamic_sampling/filled": 1.0}  # fmt: skip
    # rows of widths 3 and 5, left-padded to 5: each keeps its tokens at its right end, positions follow the mask
    assert rollout.input_ids.shape == (4, 5)
    assert rollout.attention_mask.tolist()[0] == [0, 0, 1, 1, 1] and rollout.attention_mask.tolist()[2] == [1] * 5
    assert rollout.labels.tolist()[0] == [-100, -100, -100, -100, 2] and rollout.sampler_logprobs.shape == (4, 4)
    assert reports[0]["response_tokens"] == 1 + 1 + 3 + 3
    assert rollout.generation_seconds == 1.0 and reports[0]["generation_seconds"] == 3.0


def test_dynamic_sampling_stops_at_the_cap_and_says_the_step_was_not_filled():
    draws = _Draws([[[1, 1], [0, 0]], [[1, 0], [2, 2]], [[5, 5], [3, 3]], [[0, 1], [1, 0]]], max_batches=3)
    tasks, (rollout, _, _), reports = draws.batch(0)
    tasks, rollout, reports = fill_with_informative_groups(draws, tasks, rollout, reports, generation_step=0, step=0)
    assert draws.drawn == ["0.1", "0.2"]  # the cap: 3 batches in all; batch 3 is never drawn
    # the one informative group, then the latest uninformative one in the empty place
    assert rollout.completions == ["1:0", "1:1", "2:2", "2:3"]
    assert reports[0]["dynamic_sampling"]["dynamic_sampling/filled"] == 0.0
    assert reports[0]["dynamic_sampling"]["dynamic_sampling/dropped"] == 5.0


def test_a_grpo_run_with_dynamic_sampling_logs_its_draws(tiny_model_dir, tmp_path):
    from twophase.trainers.grpo import run_grpo
    from twophase.trainers.infra.run import MetricsLog

    lean_demo = str(Path(__file__).resolve().parents[1] / "data" / "samples" / "lean_demo.jsonl")
    config = make_config(GRPOConfig, dict(
        model=tiny_model_dir, dataset=lean_demo, out_dir=str(tmp_path / "run"), max_steps=2, prompts_per_step=2,
        num_generations=3, max_new_tokens=6, micro_batch_size=6, reward="zero", precision="fp32", device="cpu",
        save_every=0, log_every=0, optimizer="adamw", lora=False, algorithm="dapo", dynamic_sampling_max_batches=2,
    ))  # fmt: skip
    out = run_grpo(config)
    records = MetricsLog(Path(out["metrics"])).read()
    # zero rewards never differ: every step draws its 2 batches, drops all 4 groups, and is not filled
    assert [(r["dynamic_sampling/batches"], r["dynamic_sampling/dropped"], r["dynamic_sampling/filled"]) for r in records] \
        == [(2.0, 4.0, 0.0)] * 2
    assert len(Path(out["samples"]).read_text().splitlines()) == 2 * 2 * 3  # the rows trained on, not the dropped ones


def test_dynamic_sampling_refuses_several_processes(monkeypatch):
    from twophase.trainers.grpo import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_size(GRPOConfig())  # without it, two processes are fine
    with pytest.raises(UserError, match="dynamic_sampling runs on one process only"):
        check_world_size(GRPOConfig(dynamic_sampling=True))
