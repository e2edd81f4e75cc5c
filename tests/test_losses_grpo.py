"""GRPO advantages and clipped loss against hand-computed values."""

import math

import pytest
import torch

from twophase.losses.grpo import aggregate, group_advantages, grpo_loss, k3_kl


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    # group 1: mean 0.5, Bessel std = sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert adv.tolist()[:4] == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    # group 2 has no spread: exactly zero, never NaN, even with eps = 0
    assert adv.tolist()[4:] == [0.0, 0.0, 0.0, 0.0]

    adv_eps = group_advantages(rewards, group_size=4, eps=1e-4)
    assert adv_eps[0].item() == pytest.approx(0.5 / (s + 1e-4))


def test_batch_and_none_scales():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0])
    none = group_advantages(rewards, group_size=2, scale="none")
    assert none.tolist() == [-1.0, 1.0, 0.0, 0.0]
    batch = group_advantages(rewards, group_size=2, scale="batch", eps=0.0)
    std = torch.tensor([1.0, 3.0, 0.0, 0.0]).std().item()  # Bessel: sqrt(((0)^2+(2)^2+(1)^2+(1)^2)/3) = sqrt(2)
    assert std == pytest.approx(math.sqrt(2))
    assert batch.tolist() == pytest.approx([-1 / std, 1 / std, 0.0, 0.0])


def test_wrong_batch_size_and_scale():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(torch.zeros(4), group_size=2, scale="rank")


def _case():
    # two sequences, T = 3; second has only 2 response tokens
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    return logps, mask, adv


def test_gradient_at_ratio_one_is_minus_advantage_normalised():
    for aggregation, expected in (
        ("token", [[-2 / 5] * 3, [1 / 5, 1 / 5, 0.0]]),
        ("sequence", [[-2 / 3 / 2] * 3, [1 / 2 / 2, 1 / 2 / 2, 0.0]]),
        ("constant", [[-2 / 6] * 3, [1 / 6, 1 / 6, 0.0]]),
    ):
        logps, mask, adv = _case()
        loss, metrics = grpo_loss(logps, logps.detach(), adv, mask, aggregation=aggregation)
        loss.backward()
        torch.testing.assert_close(logps.grad, torch.tensor(expected, dtype=torch.float64))
        assert metrics["clip_fraction_low"] == 0 and metrics["clip_fraction_high"] == 0


def test_loss_values_per_aggregation():
    logps, mask, adv = _case()
    loss_tok, _ = grpo_loss(logps, logps.detach(), adv, mask, aggregation="token")
    # at ρ = 1: per-token −A; token: (−2·3 + 1·2)/5
    assert loss_tok.item() == pytest.approx((-6 + 2) / 5)
    loss_seq, _ = grpo_loss(logps, logps.detach(), adv, mask, aggregation="sequence")
    assert loss_seq.item() == pytest.approx((-2 + 1) / 2)
    loss_const, _ = grpo_loss(logps, logps.detach(), adv, mask, aggregation="constant", max_response_length=4)
    assert loss_const.item() == pytest.approx((-6 + 2) / (2 * 4))


def test_clipping_on_both_sides():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios: 1.5, 0.5, 1.1, 0.5
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(1, 4, dtype=torch.float64)
    loss_pos, m_pos = grpo_loss(logps, old, torch.tensor([1.0], dtype=torch.float64), mask, clip_low=0.2, clip_high=0.3)
    # A > 0: min(ρA, clip(ρ)A) = [1.3, 0.5, 1.1, 0.5]
    assert loss_pos.item() == pytest.approx(-(1.3 + 0.5 + 1.1 + 0.5) / 4)
    assert m_pos["clip_fraction_high"] == pytest.approx(0.25) and m_pos["clip_fraction_low"] == 0
    loss_pos.backward()
    # clipped token gets no gradient; others −ρ·A/4 (d ρ / d logp = ρ)
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.5 / 4, -1.1 / 4, -0.5 / 4]], dtype=torch.float64))

    logps.grad = None
    loss_neg, m_neg = grpo_loss(logps, old, torch.tensor([-1.0], dtype=torch.float64), mask, clip_low=0.2, clip_high=0.3)
    # A < 0: min(−ρ, −clip(ρ)) = −max(ρ, clip ρ) = [−1.5, −0.8, −1.1, −0.8]
    assert loss_neg.item() == pytest.approx((1.5 + 0.8 + 1.1 + 0.8) / 4)
    assert m_neg["clip_fraction_low"] == pytest.approx(0.5) and m_neg["clip_fraction_high"] == 0


def test_k3_is_nonnegative_and_equals_its_formula():
    torch.manual_seed(0)
    logps = torch.randn(3, 5, dtype=torch.float64)
    ref = torch.randn(3, 5, dtype=torch.float64)
    kl = k3_kl(logps, ref)
    d = ref - logps
    torch.testing.assert_close(kl, torch.exp(d) - d - 1)
    assert (kl >= 0).all()
    assert k3_kl(logps, logps).abs().max() == 0


def test_kl_term_adds_beta_k3_and_reports_mean():
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss, metrics = grpo_loss(logps, logps.detach(), torch.tensor([0.0], dtype=torch.float64), mask, ref_logps=ref, beta=0.5)
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert loss.item() == pytest.approx(0.5 * sum(k3) / 2)
    assert metrics["kl"] == pytest.approx(sum(k3) / 2)


def test_huge_log_ratio_is_clamped_not_inf():
    logps = torch.tensor([[100.0]], requires_grad=True)
    loss, _ = grpo_loss(logps, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert torch.isfinite(loss)


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="token, sequence, constant"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_micro_batch_shares_add_up_to_the_whole_batch_loss_and_gradient(aggregation):
    """With the whole batch's normaliser, any split of the rows gives shares whose sum is the batch's loss (float64)."""
    from twophase.losses.grpo import loss_normaliser

    generator = torch.Generator().manual_seed(0)
    logps = torch.randn(6, 5, dtype=torch.float64, generator=generator).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(6, 5, dtype=torch.float64, generator=generator)
    advantages = torch.randn(6, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    whole, _ = grpo_loss(logps, old, advantages, mask, aggregation=aggregation, max_response_length=7)
    (whole_grad,) = torch.autograd.grad(whole, logps)
    normaliser = loss_normaliser(aggregation, 6, float(mask.sum()), 7)
    shares = [grpo_loss(logps[rows], old[rows], advantages[rows], mask[rows], aggregation=aggregation, normaliser=normaliser)[0]
              for rows in (slice(0, 1), slice(1, 4), slice(4, 6))]  # fmt: skip
    (split_grad,) = torch.autograd.grad(sum(shares), logps)
    assert float(sum(shares)) == pytest.approx(float(whole), rel=1e-14)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-13, atol=0)
    # and by hand for "token": the sum of per-token losses over all 20 response tokens, / 20
    if aggregation == "token":
        ratio = torch.exp(logps - old)
        per_token = -torch.min(ratio * advantages[:, None], ratio.clamp(0.8, 1.2) * advantages[:, None])
        assert float(whole) == pytest.approx(float((per_token * mask).sum() / 20), rel=1e-14)
