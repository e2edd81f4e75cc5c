"""Stochastic rounding keeps small bf16 updates on average; the 8-bit optimizer uses it; schedules."""

import pytest
import torch

from twophase.trainers.config import TrainConfig
from twophase.trainers.infra.optim import build_optimizer, build_scheduler, stochastic_round_to_bf16_


def test_stochastic_rounding_is_unbiased_where_nearest_loses_the_update():
    torch.manual_seed(0)
    target = 0.02 - 1e-6  # 1e-6 below a bf16 value of 0.02's neighbourhood; the spacing there is ~1.2e-4
    source = torch.full((1_000_000,), target, dtype=torch.float32)
    nearest = source.to(torch.bfloat16).float()
    assert (nearest - target).abs().mean() > 5e-7  # nearest rounding: the 1e-6 step is lost or overshot
    rounded = stochastic_round_to_bf16_(torch.empty(1_000_000, dtype=torch.bfloat16), source).float()
    lower, upper = rounded.min().item(), rounded.max().item()
    assert lower < target < upper and len(rounded.unique()) == 2  # only the two neighbours occur
    assert rounded.double().mean().item() == pytest.approx(target, abs=3e-7)  # unbiased


def test_negative_values_and_exact_values():
    source = torch.tensor([-0.75, 1.0, -3.0, 0.0])  # exactly representable: never moved
    out = stochastic_round_to_bf16_(torch.empty(4, dtype=torch.bfloat16), source)
    assert out.float().tolist() == [-0.75, 1.0, -3.0, 0.0]
    torch.manual_seed(1)
    neg = torch.full((200_000,), -(0.02 - 1e-6))
    mean = stochastic_round_to_bf16_(torch.empty(200_000, dtype=torch.bfloat16), neg).double().mean().item()
    assert mean == pytest.approx(-(0.02 - 1e-6), abs=1e-6)


def test_eight_bit_adamw_moves_bf16_weights_by_lr_on_average():
    """First Adam step: update = −lr·sign(g). At lr = 1e-5 nearest rounding keeps almost none of it."""
    torch.manual_seed(0)
    start = (torch.randn(256, 512) * 0.02).to(torch.bfloat16)
    grad = torch.randn(256, 512).to(torch.bfloat16)
    moved = {}
    for rounding in (False, True):
        weight = torch.nn.Parameter(start.clone())
        config = TrainConfig(lr=1e-5, optimizer="adamw8bit", stochastic_rounding=rounding)
        optimizer = build_optimizer([weight], config)
        weight.grad = grad.clone()
        optimizer.step()
        assert weight.dtype == torch.bfloat16 and optimizer.state[weight]["state1"].dtype == torch.uint8
        moved[rounding] = ((weight.detach().float() - start.float()) * -torch.sign(grad.float())).mean().item()
    assert moved[False] < 0.3e-5  # most of the update is rounded away
    assert moved[True] == pytest.approx(1e-5, rel=0.1)  # kept on average


def test_schedules():
    param = torch.nn.Parameter(torch.zeros(1))
    def lrs(**kw):
        config = TrainConfig(lr=1.0, max_steps=5, optimizer="adamw", **kw)
        opt = build_optimizer([param], config)
        sched = build_scheduler(opt, config)
        values = []
        for _ in range(5):
            values.append(sched.get_last_lr()[0])
            opt.step(); sched.step()
        return values
    assert lrs(lr_schedule="constant", warmup_steps=1) == pytest.approx([0.5, 1, 1, 1, 1])
    assert lrs(lr_schedule="linear") == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    assert lrs(lr_schedule="cosine", warmup_steps=1)[1] == pytest.approx(1.0)
