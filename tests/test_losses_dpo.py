"""DPO loss values and gradients against hand-computed numbers (float64)."""

import math

import pytest
import torch

from twophase.losses.dpo import dpo_loss


def _inputs(pc, pr, rc, rr):
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return t(pc), t(pr), t(rc), t(rr)


def _log_sigmoid(z):
    return -math.log1p(math.exp(-z))


def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


# Two pairs: Δ = (π_c − ref_c) − (π_r − ref_r)
PC, PR, RC, RR = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -5.0], [-11.5, -2.0]
DELTAS = [(-10 + 11) - (-12 + 11.5), (-4 + 5) - (-3 + 2)]  # [1.5, 2.0]


def test_sigmoid_values_rewards_and_gradient():
    beta = 0.1
    pc, pr, rc, rr = _inputs(PC, PR, RC, RR)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta)
    expected = [-_log_sigmoid(beta * d) for d in DELTAS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([0.1 * 1.0, 0.1 * 1.0])
    assert rejected_rewards.tolist() == pytest.approx([0.1 * -0.5, 0.1 * -1.0])
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    # dL/dΔ = −β·σ(−βΔ); dΔ/dπ_c = 1, dΔ/dπ_r = −1, dΔ/dref_c = −1
    dldd = [-beta * _sigmoid(-beta * d) for d in DELTAS]
    assert pc.grad.tolist() == pytest.approx(dldd, rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([-g for g in dldd], rel=1e-12)
    assert rc.grad.tolist() == pytest.approx([-g for g in dldd], rel=1e-12)


def test_label_smoothing_is_conservative_dpo():
    beta, eps = 0.5, 0.1
    pc, pr, rc, rr = _inputs(PC, PR, RC, RR)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * _log_sigmoid(beta * d) - eps * _log_sigmoid(-beta * d) for d in DELTAS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    losses.sum().backward()
    # d/dΔ [−(1−ε)logσ(βΔ) − ε logσ(−βΔ)] = −β(1−ε)σ(−βΔ) + βεσ(βΔ)
    grad = [-beta * (1 - eps) * _sigmoid(-beta * d) + beta * eps * _sigmoid(beta * d) for d in DELTAS]
    assert pc.grad.tolist() == pytest.approx(grad, rel=1e-12)


def test_robust():
    beta, eps = 0.2, 0.25
    pc, pr, rc, rr = _inputs(PC, PR, RC, RR)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    expected = [(-(1 - eps) * _log_sigmoid(beta * d) + eps * _log_sigmoid(-beta * d)) / (1 - 2 * eps) for d in DELTAS]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    losses.sum().backward()
    grad = [(-beta * (1 - eps) * _sigmoid(-beta * d) - beta * eps * _sigmoid(beta * d)) / (1 - 2 * eps) for d in DELTAS]
    assert pc.grad.tolist() == pytest.approx(grad, rel=1e-12)


def test_ipo_and_hinge():
    beta = 0.25
    pc, pr, rc, rr = _inputs(PC, PR, RC, RR)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert losses.tolist() == pytest.approx([(1.5 - 2.0) ** 2, (2.0 - 2.0) ** 2])
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([2 * (1.5 - 2.0), 0.0])

    pc, pr, rc, rr = _inputs(PC, PR, RC, RR)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 0.0])  # βΔ = 1.5, 2 ≥ 1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    assert losses.tolist() == pytest.approx([1 - 0.75, 0.0])
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-0.5, 0.0])


def test_stable_at_extreme_margins():
    big = torch.tensor([1e4, -1e4], dtype=torch.float32)
    zero = torch.zeros(2)
    losses, _, _ = dpo_loss(big, zero, zero, zero, beta=1.0)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(1e4, rel=1e-6)


def test_unknown_loss_type_names_valid_ones():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge"):
        dpo_loss(z, z, z, z, loss_type="kto")
